"""Exact attention through the best IO-aware kernel present: ``swap_attention(model, "flash")``.

Order for ``backend="auto"``: ``flash_attn`` (FlashAttention-2) on CUDA when installed; else transformers'
``flash_attention_2`` route when transformers reports it available (CUDA); else torch SDPA forced to its flash backend
(the CPU has one: ``_scaled_dot_product_flash_attention_for_cpu``). Each layer records the kernel that actually ran
(:func:`flash_backends`); a call the chosen kernel cannot take (e.g. a padding mask for ``flash_attn_func``) falls back
to the next one and says so. Asking explicitly for ``flash_attn`` or ``transformers`` where they cannot run is an
error at swap time, before the model changes.

The CUDA branches (``flash_attn``, ``transformers``) are unverified: no GPU was available when this was written.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..configs import VariantConfig
from ..reference import reference_attention
from ..registry import default_mask, layer_swap, register_variant
from ._common import in_reference_mode, model_sites, swap_config
from .gqa import grouped_attention
from .sliding_window import check_no_softcap

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "transformers", "sdpa_flash")


def flash_attn_available() -> bool:
    """The ``flash_attn`` package is importable and CUDA is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def transformers_flash_available() -> bool:
    """transformers' own ``flash_attention_2`` route can run (its availability check, and CUDA)."""
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover
        return False
    return bool(is_flash_attn_2_available()) and torch.cuda.is_available()


@dataclass
class FlashConfig(VariantConfig):
    """Options of ``flash``.

    Attributes:
        backend: ``auto`` (best available, works everywhere), ``flash_attn`` (FlashAttention-2, CUDA + flash_attn),
            ``transformers`` (transformers' flash_attention_2 route, CUDA) or ``sdpa_flash`` (torch SDPA flash
            backend, CPU or CUDA).
    """

    backend: str = "auto"
    option_choices = {"backend": BACKENDS}  # listed by `hf-attn-swap variants`

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown flash backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")

    def check_model(self, model: Any, layers: list[int]) -> None:
        check_no_softcap(model, "flash")
        dev = next(model.parameters()).device
        if self.backend == "flash_attn":
            why = []
            if importlib.util.find_spec("flash_attn") is None:
                why.append("the flash_attn package is not installed")
            if dev.type != "cuda" or not torch.cuda.is_available():
                why.append(f"the model is on {dev.type}, FlashAttention-2 runs on CUDA only")
            if why:
                raise ValueError(
                    f"backend='flash_attn' cannot run: {'; '.join(why)}; allowed here: backend='auto' or "
                    "'sdpa_flash' (torch's flash kernel, CPU included)"
                )
        if self.backend == "transformers" and (dev.type != "cuda" or not transformers_flash_available()):
            raise ValueError(
                "backend='transformers' needs transformers' flash_attention_2 (flash_attn or kernels installed) and "
                f"a CUDA model (it is on {dev.type}); allowed here: backend='auto' or 'sdpa_flash'"
            )


def _record(module: nn.Module, backend: str) -> None:
    swap = layer_swap(module)
    if swap is not None and swap.state.get("backend") != backend:
        # DEBUG, not INFO: every layer reports on its first call (30 identical lines on a 30-layer model); the swap's
        # one INFO line says what was swapped, and flash_backends(model) says which kernel each layer ran.
        if swap.state.get("backend") is None:
            logger.debug("flash attention: layer %d runs %s", swap.layer_idx, backend)
        else:
            logger.debug("flash attention: layer %d switched from %s to %s", swap.layer_idx, swap.state["backend"],
                         backend)
        swap.state["backend"] = backend


def _flash_attn_call(module, query, key, value, dropout, scaling):  # pragma: no cover - CUDA only
    from flash_attn import flash_attn_func

    q_len = query.shape[2]
    causal = bool(getattr(module, "is_causal", True)) and q_len > 1
    # flash_attn aligns causal masks bottom-right when q < kv (2.1+), handles H_kv < H natively; layout (b, n, H, d).
    return flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout,
        softmax_scale=scaling, causal=causal,
    )


def flash_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Exact softmax attention through the best available IO-aware kernel. Returns ``(b, q, H, d)``."""
    cfg = swap_config(module, FlashConfig)
    if in_reference_mode():
        out = reference_attention(query, key, value, attention_mask, scaling=scaling,
                                  is_causal=bool(getattr(module, "is_causal", True)))
        return out, None
    backend = cfg.backend
    cuda = query.is_cuda
    if backend == "auto":
        backend = "flash_attn" if cuda and flash_attn_available() else (
            "transformers" if cuda and transformers_flash_available() else "sdpa_flash")
    half = query.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash_attn" and attention_mask is None and half:  # pragma: no cover - CUDA only
        _record(module, "flash_attn")
        return _flash_attn_call(module, query, key, value, dropout, scaling), None
    if backend == "transformers" and attention_mask is None and half:  # pragma: no cover - CUDA only
        from transformers.integrations.flash_attention import flash_attention_forward

        _record(module, "transformers_flash_attention_2")
        return flash_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling)
    # Padding masks, fp32, CPU: torch's flash kernel (it takes boolean masks and grouped K/V on CPU).
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = grouped_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
        _record(module, "sdpa_flash" if backend == "sdpa_flash" else f"sdpa_flash (fallback from {backend})")
        return out
    except RuntimeError:  # the flash backend refused this call (e.g. a mask on CUDA): let SDPA choose
        out = grouped_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
        _record(module, "sdpa (flash backend refused this call)")
        return out


def flash_backends(model: nn.Module) -> dict[int, str]:
    """Layer index -> the kernel its last ``flash`` call actually ran (layers not yet run are absent)."""
    out = {}
    for s in model_sites(model):
        swap = layer_swap(s.module)
        if swap is not None and swap.variant == "flash" and "backend" in swap.state:
            out[s.layer_idx] = swap.state["backend"]
    return out


register_variant(
    "flash",
    flash_attention,
    config=FlashConfig,
    mask_fn=default_mask,
    description="exact attention through the best IO-aware kernel present (flash_attn on CUDA, transformers' "
    "flash_attention_2, else torch SDPA's flash kernel); reports the kernel that ran",
)
