"""Sliding-window attention with attention sinks: ``swap_attention(model, "sliding_window", window=W, sinks=S)``.

Semantics (Mistral's, so a converted model matches ``MistralForCausalLM``): key ``j`` is visible from query ``i`` when
``i - window < j <= i``, positions being cache indices; with ``sinks=S`` the first ``S`` positions also stay visible
(StreamingLLM). Prefill runs blocked local attention (``O(n * window)`` work, :mod:`.blocked`); decode reads a bounded
cache (:class:`.cache_layers.KVWindowLayer`: the sinks plus the last ``window - 1`` tokens), so prefill and
token-by-token decode agree and memory per layer stays at ``window + sinks`` however long generation runs.

Saving: a bias-free Llama (or a Mistral) with one window on every layer and no sinks IS a Mistral with
``sliding_window=window``; a Qwen2 is its own config with ``use_sliding_window``. :func:`vanilla_export` returns
those configs; everything else needs the sidecar.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..configs import VariantConfig
from ..reference import reference_sliding_window_attention
from ..registry import default_mask, register_variant
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
from .blocked import blocked_local_attention
from .cache_layers import KVWindowLayer
from .gqa import FOLD_MAX_QUERY, grouped_attention

logger = logging.getLogger(__name__)


def _check_int(name: str, value: Any, lo: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_no_softcap(model: Any, variant: str) -> None:
    """Variants that run SDPA-style kernels cannot cap logits (Gemma-2's ``attn_logit_softcapping``)."""
    cap = getattr(getattr(model, "config", None), "attn_logit_softcapping", None)
    if cap:
        raise ValueError(
            f"{variant} cannot apply attention logit soft-capping (attn_logit_softcapping={cap}); allowed: models "
            "without soft-capping, or the gqa variant"
        )


@dataclass
class SlidingWindowConfig(VariantConfig):
    """Options of ``sliding_window``.

    Attributes:
        window: visible tokens including the current one (Mistral's ``sliding_window``), >= 1.
        sinks: number of first tokens that stay visible (StreamingLLM), ``0 <= sinks < window``.
        block_size: queries per block of the blocked prefill; 0 picks ``clamp(window // 8, 32, 256)``.
    """

    window: int = 4096
    sinks: int = 0
    block_size: int = 0

    def __post_init__(self) -> None:
        _check_int("window", self.window, 1, "a positive integer (visible tokens including the current one)")
        _check_int("sinks", self.sinks, 0, "a non-negative integer smaller than window")
        if self.sinks >= self.window:
            raise ValueError(
                f"sinks={self.sinks} must be smaller than window={self.window}; allowed: 0 <= sinks < window"
            )
        _check_int("block_size", self.block_size, 0, "0 (automatic) or a positive integer")

    def check_model(self, model: Any, layers: list[int]) -> None:
        require_causal(model, "sliding_window")
        check_no_softcap(model, "sliding_window")

    def make_cache_layer(self) -> KVWindowLayer:
        """The bounded cache layer this window needs."""
        return KVWindowLayer(window=self.window, sinks=self.sinks)


def key_layout(
    module: torch.nn.Module, key: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, q_len: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Positions ``(kv,)`` and validity ``(b, kv)`` of the keys this call received, and the number of tokens so far.

    With the variant's cache layer they come from it; without a cache the keys are positions ``0..kv-1``.
    """
    kv = key.shape[2]
    new_valid = new_token_validity(attention_mask, batch, q_len, key.device)
    layer = current_cache_layer(module)
    if isinstance(layer, KVWindowLayer) and layer.last_positions is not None:
        return layer.last_positions, layer.commit_validity(new_valid), layer.cumulative_length
    positions = torch.arange(kv, device=key.device)
    old = torch.ones(batch, kv - q_len, dtype=torch.bool, device=key.device)
    return positions, torch.cat([old, new_valid], dim=1), kv


def sliding_window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sliding-window attention with sinks; blocked in prefill, bounded cache in decode. ``(b, q, H, d)``."""
    cfg = swap_config(module, SlidingWindowConfig)
    b, h, q_len, d = query.shape
    positions, valid, total = key_layout(module, key, attention_mask, b, q_len)
    q_start = total - q_len
    any_pad = not bool(valid.all())
    if in_reference_mode():
        out = reference_sliding_window_attention(
            query, key, value, window=cfg.window, sinks=cfg.sinks, key_valid=valid,
            q_positions=torch.arange(q_start, total, device=query.device), k_positions=positions, scaling=scaling,
        )
        return out, None
    kv = key.shape[2]
    last = int(positions[-1]) if kv else -1
    if last == kv - 1:  # contiguous from 0: nothing evicted
        n_sink, tail_start = 0, 0
    else:
        n_sink = int((positions < cfg.sinks).sum())
        tail_start = int(positions[n_sink])
    if q_len <= FOLD_MAX_QUERY:
        # Decode / short chunks: the keys are already bounded (<= sinks + window - 1 + q), one masked call.
        qp = torch.arange(q_start, total, device=query.device)[:, None]
        kp = positions[None, :]
        mask = (kp <= qp) & ((qp - kp < cfg.window) | (kp < cfg.sinks))
        mask = mask[None, None] & valid[:, None, None, :] if any_pad else mask[None, None]
        return grouped_attention(module, query, key, value, mask, dropout=dropout, scaling=scaling)
    out = blocked_local_attention(
        query, key, value, q_start=q_start, n_sink=n_sink, tail_start=tail_start, window=cfg.window,
        sinks=cfg.sinks, key_valid=valid if any_pad else None, scaling=scaling, dropout=dropout,
        block=cfg.block_size or None,
    )
    return out, None


def _prepare(model: torch.nn.Module, config: SlidingWindowConfig, layers: list[int]) -> None:
    for m in attention_sites_of(model, layers):
        add_cache_hooks(m)


def _restore(model: torch.nn.Module, layers: list[int]) -> None:
    for m in attention_sites_of(model, layers):
        remove_cache_hooks(m)


#: model_type -> vanilla transformers family whose sliding window runs this swap exactly with the same state dict.
#: "mistral" needs a bias-free attention and MLP (Mistral has no biases); "qwen2" uses its own use_sliding_window.
VANILLA_SLIDING_TARGET: dict[str, str] = {"llama": "mistral", "mistral": "mistral", "qwen2": "qwen2"}


def vanilla_export(model: torch.nn.Module, step: Any) -> Any | None:
    """A vanilla config running ``step`` exactly with ``model``'s state dict, or None (then the sidecar is needed)."""
    cfg = model.config
    target = VANILLA_SLIDING_TARGET.get(getattr(cfg, "model_type", None))
    options = step.options if hasattr(step, "options") else step["options"]
    layers = step.layers if hasattr(step, "layers") else step["layers"]
    n = int(cfg.num_hidden_layers)
    if target is None or options.get("sinks", 0) or sorted(layers) != list(range(n)):
        return None
    kv_heads = {s.num_kv_heads for s in model_sites(model)}
    if kv_heads != {int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))}:
        return None  # per-layer KV heads: no vanilla family expresses that
    window = int(options["window"])
    if target == "mistral":
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            return None
        from transformers import MistralConfig

        allowed = set(MistralConfig().to_dict()) - {"model_type", "architectures", "transformers_version"}
        data = {k: v for k, v in cfg.to_dict().items() if k in allowed}
        data["sliding_window"] = window
        data["architectures"] = ["MistralForCausalLM"]
        return MistralConfig(**data)
    if target == "qwen2":
        from transformers import Qwen2Config

        data = cfg.to_dict()
        for k in ("model_type", "transformers_version", "layer_types"):
            data.pop(k, None)
        data.update(use_sliding_window=True, sliding_window=window, max_window_layers=0,
                    layer_types=["sliding_attention"] * n)
        return Qwen2Config(**data)
    return None


register_variant(
    "sliding_window",
    sliding_window_attention,
    config=SlidingWindowConfig,
    mask_fn=default_mask,
    prepare=_prepare,
    restore=_restore,
    vanilla_export=vanilla_export,
    description="causal sliding window (Mistral semantics) + attention sinks; O(n*w) blocked prefill, bounded cache",
)
