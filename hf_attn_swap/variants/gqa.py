"""GQA / MQA: merge key/value heads of a pretrained checkpoint, then attend without repeating them.

``swap_attention(model, "gqa", groups=G, strategy="mean")`` leaves ``G`` KV heads (``"mqa"`` is ``G = 1``). The
attention function reads each KV head once for all of its query heads: at decode the group is folded into the query
length (one ``(G*q, kv)`` problem per KV head); in prefill SDPA's ``enable_gqa`` is used. Neither copies K/V, so the
smaller cache also means fewer bytes read per decoded token, which is where GQA's speed-up lives. On x86-64 CPUs
(AVX-512, else AVX2) a one-token decode step in fp32 inference takes the streaming decode kernel of
:mod:`.band_cpu` instead, which reads K and V at about the rate memory allows (SDPA reads them at about 60% of it);
under torch.compile too, as the operator :mod:`.decode_op` registers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import VariantConfig
from ..convert.adapters import get_adapter
from ..convert.calibrate import second_moments
from ..progress import progress
from ..convert.pooling import CALIBRATED, STRATEGIES, convert_projections, rotary_dims_of
from ..convert.projections import build_new_modules, commit, find_attention, read_projections
from ..convert.refit import refit_layers
from ..reference import causal_bool_mask, reference_attention
from ..registry import register_variant
from . import band_cpu, decode_op
from ._common import grouped_kv

logger = logging.getLogger(__name__)

#: fold the group into the query length while G*q stays small (decode and short chunks).
FOLD_MAX_QUERY = 16
#: up to this many (folded) query rows a boolean mask is turned into an additive one on the CPU (see _additive_mask).
ADDITIVE_MASK_MAX_ROWS = 64


#: the last boolean mask turned additive: (that mask, its version counter, dtype, result). transformers builds one mask
#: per forward pass and hands the same tensor to every layer, so the conversion runs once a step, not once a layer.
_ADDITIVE_LAST: list[Any] = [None]


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean SDPA mask as an additive one (0 where attended, the dtype's lowest value elsewhere), or the mask
    unchanged when one of its rows attends to nothing.

    Why: at decode shapes the CPU SDPA kernel takes about twice as long over a boolean mask as over an additive one
    (measured at 8k tokens x 8 sequences: 7.6 against 3.2 ms per layer for MQA; bench/speed_at_scale.py). The result
    is reused while the same mask tensor comes back unchanged (the next layers of the same step). A row with nothing
    to attend to (a sequence that is all padding) keeps the boolean mask, so its output is what SDPA makes of it, not
    a uniform average of every position.
    """
    last = _ADDITIVE_LAST[0]
    if last is not None and last[0] is mask and last[1] == mask._version and last[2] == dtype:
        return last[3]
    out = mask
    if bool(mask.any(-1).all()):
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    _ADDITIVE_LAST[0] = (mask, mask._version, dtype, out)
    return out


@dataclass
class GQAConfig(VariantConfig):
    """Options of ``gqa``.

    Attributes:
        groups: number of KV heads after conversion (1 = MQA). Must divide the current KV heads of every layer.
        strategy: ``mean`` (paper), ``first``, ``random`` (paper ablations), ``fit`` (calibrated refit),
            ``align`` (Procrustes head alignment, then mean) or ``refit`` (``fit`` with attention-mixed value
            statistics, then each output projection re-solved layer by layer on the converted model's own
            activations; :mod:`hf_attn_swap.convert.refit`); ``fit``, ``align`` and ``refit`` need ``calibration=``.
        seed: seed of the ``random`` strategy.
    """

    groups: int = 1
    strategy: str = "mean"
    seed: int = 0
    option_choices = {"strategy": STRATEGIES}  # listed by `hf-attn-swap variants`

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive integer (the number of KV heads to keep), got {self.groups!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; allowed: {', '.join(STRATEGIES)}")

    def requires_calibration(self) -> bool:
        return self.strategy in CALIBRATED

    def check_model(self, model: Any, layers: list[int]) -> None:
        adapter = get_adapter(model)
        sites = find_attention(model, adapter)
        _check_materialised(sites, layers)
        heads = sites[0].num_heads
        for i in layers:
            kv = sites[i].num_kv_heads
            if self.groups > kv:
                raise ValueError(
                    f"groups={self.groups} is larger than layer {i}'s current KV heads ({kv}); "
                    f"allowed: divisors of {kv}: {_divisors(kv)}"
                )
            if kv % self.groups or heads % self.groups:
                raise ValueError(
                    f"groups={self.groups} must divide the current KV heads ({kv}) and the query heads ({heads}) of "
                    f"layer {i}; allowed: {_divisors(kv)}"
                )


@dataclass
class MQAConfig(VariantConfig):
    """Options of ``mqa`` (GQA with one KV head)."""

    strategy: str = "mean"
    seed: int = 0
    option_choices = {"strategy": STRATEGIES}

    def __post_init__(self) -> None:
        GQAConfig(1, self.strategy, self.seed)

    def requires_calibration(self) -> bool:
        return self.strategy in CALIBRATED

    def check_model(self, model: Any, layers: list[int]) -> None:
        GQAConfig(1, self.strategy, self.seed).check_model(model, layers)


def _check_materialised(sites: list[Any], layers: list[int]) -> None:
    """Refuse attention weights offloaded to ``meta`` (accelerate ``cpu_offload`` / disk offload): calibration runs
    through accelerate's hooks, but the converted weights would be written beside hooks that page the OLD weights
    back in at the next forward."""
    for i in layers:
        names = [n for n, p in sites[i].module.named_parameters() if p.device.type == "meta"]
        if names:
            raise ValueError(
                f"layer {i}'s attention weights are offloaded (on 'meta': {', '.join(names[:3])}); gqa conversion "
                "needs them materialised: load without offloading (no device_map, device_map={'': 'cuda:0'}, or "
                "a map whose entries are all devices the layers run on, with no 'disk' and no 'cpu' beside a GPU)"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Softmax attention over ``H_kv <= H`` KV heads without materialising repeated K/V.

    Accepts SDPA-format masks (4D bool, or None = causal for ``module.is_causal``, bottom-right aligned).
    Returns ``(b, q, H, d)``.
    """
    b, h, q_len, d = query.shape
    h_kv, kv_len = key.shape[1], key.shape[2]
    group = h // h_kv
    is_causal = bool(getattr(module, "is_causal", True))
    if softcap is not None:
        # SDPA cannot cap logits; the dense reference path is exact (Gemma-2).
        return reference_attention(
            query, key, value, attention_mask, scaling=scaling, is_causal=is_causal, softcap=softcap
        ), None
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask[..., -kv_len:]
    # One token per sequence in inference (a decode step): the streaming kernel, where it runs. Both checks read only
    # shapes, dtypes, strides and flags (no mask values), so torch.compile traces them into guards. Compiled, the kernel
    # is called as the operator decode_op registers (a ctypes call would break the graph at every layer); eager, it is
    # called directly: the operator's dispatch and input checks add ~13 us a call, twice the kernel's time at short
    # contexts (20.6 against 7.0 us at 16 cached tokens, one thread).
    if q_len == 1 and not dropout and band_cpu.decode_usable(query, key, value):
        valid = _decode_key_valid(mask, b, kv_len)
        if valid is not False:
            scale = d**-0.5 if scaling is None else scaling
            if torch.compiler.is_compiling():
                return decode_op.decode_attention(query, key, value, scale, valid), None
            return band_cpu.decode_attention_unchecked(query, key, value, scale, valid), None
    causal_flag = False
    if mask is None and is_causal and q_len > 1:
        if q_len == kv_len:
            causal_flag = True
        else:  # chunked prefill over a cache: SDPA's is_causal is top-left aligned, so spell the mask out
            mask = causal_bool_mask(q_len, kv_len, query.device)[None, None]
    if group > 1 and q_len <= FOLD_MAX_QUERY:
        # Fold: (b, H, q, d) -> (b, H_kv, G*q, d). One KV head serves its G query heads in one matmul.
        if causal_flag:
            mask = causal_bool_mask(q_len, kv_len, query.device)[None, None]
            causal_flag = False
        # Not while compiling: _additive_mask branches on the mask's values (a graph break under fullgraph) and
        # reuses its result by tensor identity; the compiled graph hands SDPA the boolean mask, which means the same.
        if mask is not None and mask.dtype == torch.bool and query.device.type == "cpu" \
                and group * q_len <= ADDITIVE_MASK_MAX_ROWS and not torch.compiler.is_compiling():
            mask = _additive_mask(mask, query.dtype)  # before the fold's expand: converted once, not per head
        q_f = query.reshape(b, h_kv, group * q_len, d)
        if mask is not None:
            mb = mask.shape[0]
            mask = mask.reshape(mb, -1, 1, q_len, kv_len) if mask.shape[1] == 1 else mask.reshape(mb, h_kv, group, q_len, kv_len)
            mask = mask.expand(mb, mask.shape[1], group, q_len, kv_len).reshape(mb, mask.shape[1], group * q_len, kv_len)
        out = F.scaled_dot_product_attention(q_f, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=False)
        out = out.reshape(b, h, q_len, d)
    else:
        key, value, kw = grouped_kv(key, value, h)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal_flag, **kw
        )
    return out.transpose(1, 2).contiguous(), None


def _decode_key_valid(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None | bool:
    """The decode kernel's view of a one-query SDPA mask: None (every key), a bool ``(b or 1, kv)`` row per sequence,
    or False where the kernel cannot express it (per-head or additive masks). A sequence that sees no key gets zeros
    there, as from torch's SDPA. Only the mask's dtype and shape decide (never its values), so under torch.compile the
    choice is a guard and the mask rows go into the kernel's operator as a tensor."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 \
            or mask.shape[3] != kv_len or mask.shape[0] not in (1, batch):
        return False
    return mask[:, 0, 0, :]


def convert_gqa(model: torch.nn.Module, config: GQAConfig | MQAConfig, layers: list[int], *, calibration: Any = None,
                structure_only: bool = False) -> dict[str, Any]:
    """Merge K/V heads of ``layers`` in place. Returns facts for the swap record.

    Two phases: every new tensor is computed first (any error leaves the model untouched), then all assignments are
    committed together (and rolled back together if one fails).

    Args:
        structure_only: only reshape (used when loading a saved conversion: the weights come from the checkpoint).
    """
    groups = getattr(config, "groups", 1)
    strategy = "first" if structure_only else config.strategy
    adapter = get_adapter(model)
    sites = find_attention(model, adapter)
    chosen = [sites[i] for i in layers]
    gen = torch.Generator().manual_seed(int(getattr(config, "seed", 0)))

    def new_block(site, cov: torch.Tensor | None) -> dict | None:
        """Phase 1 for one module: its new parameters (in the model's dtype, on its device), or None if unchanged."""
        new = new_projections(site, cov, None)
        return None if new is None else build_new_modules(site, adapter, new)

    def refit_blocks(site, cov: torch.Tensor, value_cov: torch.Tensor) -> tuple[dict, dict] | None:
        """refit's two blocks: the conversion, and what the converted layer runs as under eager attention. Eager
        repeats K/V only in native-GQA families (BERT's and GPT-2's eager matmuls would fail, or broadcast a single
        head); elsewhere the merged K/V rows are repeated back to the old head count, which computes the same."""
        new = new_projections(site, cov, value_cov)
        if new is None:
            return None
        block = build_new_modules(site, adapter, new)
        if adapter.native_gqa:
            return block, block
        r, d = site.num_kv_heads // groups, site.head_dim
        rep = lambda t: None if t is None else t.reshape(groups, 1, d, *t.shape[1:]).expand(  # noqa: E731
            groups, r, d, *t.shape[1:]).reshape(groups * r * d, *t.shape[1:])
        wide = new.replace(k_w=rep(new.k_w), k_b=rep(new.k_b), v_w=rep(new.v_w), v_b=rep(new.v_b))
        return block, build_new_modules(site, adapter, wide)

    def new_projections(site, cov: torch.Tensor | None, value_cov: torch.Tensor | None):
        """The module's converted projections beside its weights, or None where nothing changes."""
        p = read_projections(site.module, site.parent, adapter, head_dim=site.head_dim)
        home = p.k_w.device
        if cov is not None:
            # The fit runs in float64 on the CPU: its per-layer (E x E) eigendecompositions are small, and CPU float64
            # is fast everywhere while consumer GPUs run float64 at a small fraction of their speed.
            p, cov = _moved(p, torch.device("cpu")), cov.cpu()
            value_cov = None if value_cov is None else value_cov.cpu()
        new = convert_projections(
            p,
            num_heads=site.num_heads,
            old_kv=site.num_kv_heads,
            new_kv=groups,
            head_dim=site.head_dim,
            strategy=strategy,
            rotary_dims=rotary_dims_of(model.config, site.head_dim, adapter.rope),
            qk_norm=adapter.qk_norm,
            covariance=cov,
            generator=gen,
            value_covariance=value_cov,
        )
        if new is p:
            return None  # groups == current KV heads: bit-identical, nothing to write
        return _moved(new, home)  # back beside the model's own weights

    tokens = 0
    if strategy in CALIBRATED:
        if calibration is None:
            raise ValueError(
                f"strategy {strategy!r} needs calibration text: pass calibration=<LongTensor of input ids (n, L)> to "
                "swap_attention (e.g. a few thousand tokens of held-in text)"
            )
        # Statistics come from the ORIGINAL model, on its device and in its dtype, layer by layer where possible;
        # each layer is fitted as soon as its statistic is final (one float64 matrix alive at a time) and nothing is
        # written to the model before commit, so no fit can change the statistics of a later layer.
        if strategy == "refit":  # statistics and output projections from the original and converted stacks
            results, tokens = refit_layers(
                model, [s.module for s in chosen], [_out_proj(s, adapter) for s in chosen], calibration,
                lambda i, cov, value_cov: refit_blocks(chosen[i], cov, value_cov),
            )
        else:
            results, tokens = second_moments(
                model, [s.module for s in chosen], calibration, consume=lambda i, cov: new_block(chosen[i], cov)
            )
    else:  # a bar per layer, except when only reshaping for a load (instant); fit's bar is calibration's, per layer
        results = [new_block(site, None) for site in
                   (chosen if structure_only else progress(chosen, desc=f"{strategy} K/V heads -> {groups}", unit="layer"))]
    blocks = [b for b in results if b is not None]
    lossy = any(site.num_kv_heads != groups for site in chosen)
    uniform = len(layers) == len(sites)
    if uniform and adapter.native_gqa and hasattr(model.config, "num_key_value_heads"):
        blocks.append({(id(model.config), "num_key_value_heads"): (model.config, "num_key_value_heads", groups)})
    commit(blocks)
    return {
        "lossy": lossy,
        # A vanilla transformers model of the same family can load the result (no sidecar needed to run it).
        "vanilla": uniform and adapter.native_gqa,
        "calibration_tokens": tokens,
    }


def _out_proj(site, adapter) -> tuple[torch.nn.Module, bool]:
    """A site's output projection and whether it stores its weight ``(in, out)`` (GPT-2's Conv1D)."""
    from ..convert.projections import _resolve

    return _resolve(site.module, site.parent, adapter.o), adapter.layout == "conv1d"


def _moved(p, device: torch.device):
    """Projections with every tensor on ``device`` (a no-op for tensors already there)."""
    return p.replace(**{k: None if v is None else v.detach().to(device) for k, v in vars(p).items()})


def vanilla_export(model: torch.nn.Module, step: Any):
    """GPT-2 converted to MQA saves as GPT-BigCode (``multi_query=True``); other families have no other form."""
    from ..convert.vanilla import gpt2_mqa_as_bigcode

    return gpt2_mqa_as_bigcode(model)


register_variant(
    "gqa",
    grouped_attention,
    config=GQAConfig,
    convert=convert_gqa,
    vanilla_export=vanilla_export,
    description="grouped-query attention: merge K/V heads (mean/first/random/fit/align), attend without repeating K/V",
)
register_variant(
    "mqa",
    grouped_attention,
    config=MQAConfig,
    convert=convert_gqa,  # MQAConfig has no groups: convert_gqa reads 1
    vanilla_export=vanilla_export,
    description="multi-query attention: gqa with one K/V head",
)
