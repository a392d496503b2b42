"""Causal linear attention: ``swap_attention(model, "linear", feature_map="elu")``.

``out_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)`` with ``S_i = sum_{j<=i} phi(k_j) v_j^T`` and ``z_i = sum_{j<=i}
phi(k_j)``; ``phi`` is applied to the queries and keys the attention function receives (after RoPE), with no softmax
and no scaling (Katharopoulos et al. 2020; ``elu`` is exactly ``elu(x) + 1``). Feature maps: :mod:`.feature_maps`.

* Prefill: chunked (``chunk_size`` tokens per step), ``O(n * (chunk + m) * d)`` time, memory independent of ``n^2``.
* Decode: the recurrent state ``(S, z)`` lives in the transformers cache (:class:`.cache_layers.LinearStateLayer`):
  constant memory in the context length, no K/V kept. Prefill hands its final state to decode.
* GQA: the state is per KV head and the group of query heads reads it through broadcasting; nothing is repeated.
* ``window=W``: the LoLCATs hybrid, exact softmax over the last ``W`` tokens plus this linear attention over the
  older ones, in the same layer (:mod:`.hybrid`).
* ``kernel="fla"`` (or ``"auto"`` with flash-linear-attention installed and CUDA tensors) runs fla's chunked kernel,
  held to the same reference; unverified here (no GPU was available when this was written).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..configs import VariantConfig
from ..reference import reference_linear_attention
from ..registry import default_mask, layer_swap, register_variant
from ._common import (
    add_cache_hooks,
    attention_sites_of,
    current_cache_layer,
    in_reference_mode,
    model_sites,
    new_token_validity,
    remove_cache_hooks,
    require_causal,
    swap_config,
)
from .cache_layers import HybridStateLayer, LinearStateLayer
from .feature_maps import FEATURE_MAPS, FeatureMap, canonical_feature_map
from .sliding_window import check_no_softcap

logger = logging.getLogger(__name__)

#: submodule name of the feature map on each swapped attention module (its parameters appear in the state dict).
FEATURE_MAP_ATTR = "hf_attn_swap_feature_map"
KERNELS = ("auto", "torch", "fla")


def fla_available() -> bool:
    """flash-linear-attention importable and a CUDA device present."""
    return importlib.util.find_spec("fla") is not None and torch.cuda.is_available()


@dataclass
class LinearConfig(VariantConfig):
    """Options of ``linear``.

    Attributes:
        feature_map: ``elu`` (= ``elu+1``), ``relu``, ``performer`` (= ``favor+``), ``taylor`` (= ``based``) or
            ``hedgehog`` (learnable).
        num_features: random/learned features for performer and hedgehog; 0 = head size.
        chunk_size: tokens per step of the chunked prefill.
        seed: seed of the random features (layer ``i`` uses ``seed + i``).
        eps: added to the normaliser.
        kernel: ``auto`` (fla on CUDA when installed, else torch), ``torch`` or ``fla`` (needs fla and CUDA).
        window: 0 = linear attention alone; ``W > 0`` = LoLCATs hybrid: the last ``W`` tokens (the current one
            included) get exact softmax attention, older ones linear attention, in the same layer
            (:mod:`.hybrid`); decode then keeps ``W - 1`` keys/values plus the state.
    """

    feature_map: str = "elu"
    num_features: int = 0
    chunk_size: int = 64
    seed: int = 0
    eps: float = 1e-6
    kernel: str = "auto"
    window: int = 0
    option_choices = {"feature_map": FEATURE_MAPS, "kernel": KERNELS}  # listed by `hf-attn-swap variants`

    def __post_init__(self) -> None:
        self.feature_map = canonical_feature_map(self.feature_map)
        for name, lo in (("num_features", 0), ("chunk_size", 1), ("seed", 0), ("window", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        self.eps = float(self.eps)
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; allowed: {', '.join(KERNELS)}")
        if self.window and self.kernel == "fla":
            raise ValueError("kernel='fla' has no softmax-window hybrid; allowed with window > 0: kernel='auto' or "
                             "'torch'")

    def check_model(self, model: Any, layers: list[int]) -> None:
        require_causal(model, "linear")
        check_no_softcap(model, "linear")
        if self.kernel == "fla":
            if importlib.util.find_spec("fla") is None:
                raise ValueError("kernel='fla' needs flash-linear-attention (pip install flash-linear-attention); "
                                 "allowed here: kernel='auto' or 'torch'")
            dev = next(model.parameters()).device
            if dev.type != "cuda":
                raise ValueError(f"kernel='fla' needs the model on a CUDA device (it is on {dev}); allowed here: "
                                 "kernel='auto' or 'torch'")

    def make_cache_layer(self) -> LinearStateLayer | HybridStateLayer:
        return HybridStateLayer(window=self.window) if self.window else LinearStateLayer()


def chunked_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    value: torch.Tensor,
    state_s: torch.Tensor | None = None,
    state_z: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention, chunk by chunk, continuing from ``(state_s, state_z)``.

    Args:
        q_feat: ``(b, H, q, m)``; k_feat ``(b, H_kv, q, m)`` (zeros for padding keys); value ``(b, H_kv, q, d)``.
        state_s: ``(b, H_kv, m, d)``; state_z ``(b, H_kv, m)``; None = empty.

    Returns:
        ``out (b, q, H, d)`` fp32, the new ``state_s`` and ``state_z``.
    """
    b, h, n, _ = q_feat.shape
    h_kv, dv = k_feat.shape[1], value.shape[-1]
    out = q_feat.new_empty(b, h_kv, h // h_kv, n, dv, dtype=torch.float32)

    def normalise(c0: int, c1: int, num: torch.Tensor, den: torch.Tensor) -> None:
        # Per chunk, while it is in cache: one pass over a whole 8k-token output costs more than its share at 4k
        # (the tensors outgrow the L3 cache), which showed as prefill time growing faster than n.
        out[..., c0:c1, :] = num / (den + eps)

    s, z = _linear_chunks(q_feat, k_feat, value, state_s, state_z, chunk_size, normalise)
    return out.reshape(b, h, n, dv).transpose(1, 2), s, z


def chunked_linear_terms(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    value: torch.Tensor,
    state_s: torch.Tensor | None = None,
    state_z: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Numerator ``(b, q, H, d)`` and normaliser ``(b, q, H, 1)`` of causal linear attention, unnormalised (the
    hybrid weighs them against its softmax window), and the new state. Arguments as :func:`chunked_linear_attention`."""
    b, h, n, _ = q_feat.shape
    dv = value.shape[-1]
    nums, dens = [], []

    def keep(c0: int, c1: int, num: torch.Tensor, den: torch.Tensor) -> None:
        nums.append(num)
        dens.append(den)

    s, z = _linear_chunks(q_feat, k_feat, value, state_s, state_z, chunk_size, keep)
    num = torch.cat(nums, dim=-2).reshape(b, h, n, dv).transpose(1, 2)
    den = torch.cat(dens, dim=-2).reshape(b, h, n, 1).transpose(1, 2)
    return num, den, s, z


def _linear_chunks(q_feat, k_feat, value, state_s, state_z, chunk_size, emit) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk loop of both functions above: ``emit(c0, c1, num, den)`` per chunk, with ``num``
    ``(b, H_kv, g, c, d)`` and ``den`` ``(b, H_kv, g, c, 1)`` (g query heads per KV head); returns the final state."""
    b, h, n, m = q_feat.shape
    h_kv, dv = k_feat.shape[1], value.shape[-1]
    g = h // h_kv
    qf = q_feat.float().reshape(b, h_kv, g, n, m)
    kf = k_feat.float().unsqueeze(2)  # (b, H_kv, 1, n, m)
    vf = value.float().unsqueeze(2)
    s = state_s.float().unsqueeze(2) if state_s is not None else qf.new_zeros(b, h_kv, 1, m, dv)
    z = state_z.float().unsqueeze(2).unsqueeze(-1) if state_z is not None else qf.new_zeros(b, h_kv, 1, m, 1)
    for c0 in range(0, n, chunk_size):
        c1 = min(n, c0 + chunk_size)
        qc, kc, vc = qf[..., c0:c1, :], kf[..., c0:c1, :], vf[..., c0:c1, :]
        a = qc @ kc.transpose(-1, -2)
        if c1 - c0 > 1:
            a = a.tril()
        emit(c0, c1, a @ vc + qc @ s, a.sum(-1, keepdim=True) + qc @ z)
        s = s + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(-2).unsqueeze(-1)
    return s.squeeze(2), z.squeeze(-1).squeeze(2)


def _fla_linear_attention(q_feat, k_feat, value, state_s, state_z, eps):  # pragma: no cover - needs CUDA + fla
    """fla's chunked kernel: numerator with ``v``, normaliser with a column of ones (``normalize=False``).

    Unverified on GPU (none was available); the test suite holds it to :func:`chunked_linear_attention` when run on
    a machine with CUDA and fla.
    """
    from fla.ops.linear_attn import chunk_linear_attn

    h, h_kv = q_feat.shape[1], k_feat.shape[1]
    if h != h_kv:  # fla has no grouped form: this repeat is of features, on the fla path only
        k_feat = k_feat.repeat_interleave(h // h_kv, dim=1)
        value = value.repeat_interleave(h // h_kv, dim=1)
        state_s = state_s.repeat_interleave(h // h_kv, dim=1) if state_s is not None else None
        state_z = state_z.repeat_interleave(h // h_kv, dim=1) if state_z is not None else None
    tq, tk = q_feat.transpose(1, 2).contiguous(), k_feat.transpose(1, 2).contiguous()
    v_ones = torch.cat([value.float(), torch.ones_like(value[..., :1]).float()], dim=-1).transpose(1, 2).contiguous()
    init = None
    if state_s is not None:
        init = torch.cat([state_s, state_z.unsqueeze(-1)], dim=-1)
    o, final = chunk_linear_attn(tq, tk, v_ones, scale=1.0, initial_state=init, output_final_state=True,
                                 normalize=False)
    num, den = o[..., :-1], o[..., -1:]
    out = num / (den + eps)
    s, z = final[..., :-1], final[..., -1]
    if h != h_kv:
        s, z = s[:, :: h // h_kv], z[:, :: h // h_kv]
    return out, s, z


def linear_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal linear attention (chunked prefill, recurrent decode through the cache). Returns ``(b, q, H, d)``."""
    cfg = swap_config(module, LinearConfig)
    fmap: FeatureMap = getattr(module, FEATURE_MAP_ATTR)
    if cfg.window:
        from .hybrid import hybrid_attention

        out = hybrid_attention(module, query, key, value, attention_mask, fmap=fmap, window=cfg.window,
                               chunk_size=cfg.chunk_size, scaling=scaling)
        return out, None
    b, h, q_len, _ = query.shape
    kv = key.shape[2]
    valid = new_token_validity(attention_mask, b, q_len, query.device)
    if kv != q_len:  # keys without our state layer (a cache we could not replace): all earlier keys are real
        valid = torch.cat([torch.ones(b, kv - q_len, dtype=torch.bool, device=query.device), valid], dim=1)
    layer = current_cache_layer(module)
    state = layer if isinstance(layer, LinearStateLayer) else None
    q_feat = fmap(query, "q")
    k_feat = fmap(key, "k") * valid[:, None, :, None]
    if in_reference_mode() and (state is None or state.state_s is None):
        out = reference_linear_attention(q_feat, k_feat, value, key_valid=valid, eps=cfg.eps)
        if state is not None:
            state.state_s = torch.einsum("bhnm,bhnd->bhmd", k_feat, value.float())
            state.state_z = k_feat.sum(2)
        return out.to(query.dtype), None
    s0 = state.state_s if state is not None else None
    z0 = state.state_z if state is not None else None
    use_fla = cfg.kernel == "fla" or (cfg.kernel == "auto" and query.is_cuda and fla_available())
    if kv != q_len:  # recompute over every key, then keep only the last q outputs
        s0 = z0 = None
    if use_fla:  # pragma: no cover - CUDA only
        out, s, z = _fla_linear_attention(q_feat, k_feat, value, s0, z0, cfg.eps)
    else:
        if kv != q_len:
            pad = q_feat.new_zeros(b, h, kv - q_len, q_feat.shape[-1])
            out, s, z = chunked_linear_attention(torch.cat([pad, q_feat], 2), k_feat, value,
                                                 chunk_size=cfg.chunk_size, eps=cfg.eps)
            out = out[:, -q_len:]
        else:
            out, s, z = chunked_linear_attention(q_feat, k_feat, value, s0, z0, chunk_size=cfg.chunk_size,
                                                 eps=cfg.eps)
    if state is not None:
        state.state_s, state.state_z = s, z
    return out.to(query.dtype), None


def _prepare(model: nn.Module, config: LinearConfig, layers: list[int]) -> None:
    # Deterministic: the same config and layers always build the same maps with the same shapes, before any state
    # dict is loaded (load_swapped replays this, then loads the weights strictly).
    sites = model_sites(model)
    for i in layers:
        site = sites[i]
        ref = next(site.module.parameters())
        fmap = FeatureMap(
            config.feature_map, site.num_heads, site.num_kv_heads, site.head_dim,
            config.num_features or site.head_dim, config.seed + i, window_mix=config.window > 0,
        ).to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else torch.float32)
        setattr(site.module, FEATURE_MAP_ATTR, fmap)
        add_cache_hooks(site.module)


def _restore(model: nn.Module, layers: list[int]) -> None:
    for m in attention_sites_of(model, layers):
        if hasattr(m, FEATURE_MAP_ATTR):
            delattr(m, FEATURE_MAP_ATTR)
        remove_cache_hooks(m)


def feature_maps(model: nn.Module) -> dict[int, FeatureMap]:
    """Layer index -> feature map of every layer running ``linear``."""
    out = {}
    for s in model_sites(model):
        swap = layer_swap(s.module)
        if swap is not None and swap.variant == "linear" and hasattr(s.module, FEATURE_MAP_ATTR):
            out[s.layer_idx] = getattr(s.module, FEATURE_MAP_ATTR)
    return out


def feature_map_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable feature-map parameters (hedgehog) of the model, for attention transfer."""
    return [p for fm in feature_maps(model).values() for p in fm.parameters()]


def redraw_performer_features(model: nn.Module, seed: int) -> int:
    """Redraw the random features of every performer layer (layer ``i`` gets ``seed + i``); returns how many."""
    n = 0
    for i, fm in feature_maps(model).items():
        if fm.name == "performer":
            fm.redraw(seed + i)
            n += 1
    return n


def require_feature_map_state(model: nn.Module, state_dict_keys: Iterable[str]) -> None:
    """Raise if a checkpoint lacks the learned feature maps of ``model``'s hedgehog layers.

    Hedgehog maps are trained (attention transfer); a checkpoint without them would silently run freshly initialised
    maps. Call with the keys of the state dict about to be loaded.
    """
    keys = set(state_dict_keys)
    missing = []
    for name, module in model.named_modules():
        fm = getattr(module, FEATURE_MAP_ATTR, None)
        if isinstance(fm, FeatureMap) and fm.name == "hedgehog":
            for pname, _ in fm.named_parameters():
                k = f"{name}.{FEATURE_MAP_ATTR}.{pname}"
                if k not in keys:
                    missing.append(k)
    if missing:
        raise ValueError(
            f"the checkpoint has no trained hedgehog feature-map state ({len(missing)} tensors missing, e.g. "
            f"{missing[0]}); hedgehog maps are learned: save the model after attention transfer, or swap with a "
            f"feature map that needs no training ({', '.join(f for f in FEATURE_MAPS if f != 'hedgehog')})"
        )


register_variant(
    "linear",
    linear_attention,
    config=LinearConfig,
    mask_fn=default_mask,
    prepare=_prepare,
    restore=_restore,
    description="causal linear attention (elu+1, relu, performer, taylor, hedgehog); chunked prefill, recurrent cache",
)
