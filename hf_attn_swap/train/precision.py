"""Mixed precision for training: matrix products in bfloat16 under ``torch.autocast``, weights and optimizer in float32.

Why it is worth a switch on a CPU: this project's machine (Xeon with AMX and AVX512-BF16) multiplies bfloat16
matrices 4-8x faster than float32 ones at one thread (1,675 against 219 GFLOP/s at 1024x576x1536), and a SmolLM2
training step of 2 x 512 tokens takes 3.4 s instead of 7.2-8.5 s. The parameters, their gradients and Adam's state
stay float32, so small updates are not lost to bfloat16 rounding the way they are with ``dtype=bfloat16`` (pure
bfloat16 weights); losses and softmaxes are computed in float32 (the objectives upcast logits).

On a CPU without those instructions bfloat16 products are emulated and slower than float32: :func:`autocast` logs a
warning there, and ``mixed_precision: "no"`` is the choice.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: accepted values of ``mixed_precision`` (accelerate's names); float16 needs loss scaling, which is not done here.
MIXED_PRECISION = ("no", "bf16")
_warned: set[str] = set()


def check_mixed_precision(value: str) -> str:
    """Return ``value`` if allowed, else raise :class:`~hf_attn_swap.cliconfig.ConfigError` naming what is."""
    from ..cliconfig import ConfigError

    if value == "fp16":
        raise ConfigError("mixed_precision=fp16 needs loss scaling, which training here does not do; allowed: "
                          + ", ".join(MIXED_PRECISION))
    if value not in MIXED_PRECISION:
        raise ConfigError(f"unknown mixed_precision {value!r}; allowed: {', '.join(MIXED_PRECISION)}")
    return value


def cpu_has_fast_bf16() -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16); None when torch cannot tell."""
    import torch

    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    probes = [p for p in probes if p is not None]
    if not probes:
        return None
    return any(bool(p()) for p in probes)


def autocast(mixed_precision: str, device: Any) -> contextlib.AbstractContextManager:
    """The context that runs forward passes on ``device`` in ``mixed_precision`` (``no``: a no-op context).

    Backward passes need no context: autograd runs each op's backward in the dtype its forward used.
    """
    import torch

    if mixed_precision == "no":
        return contextlib.nullcontext()
    check_mixed_precision(mixed_precision)
    kind = torch.device(device).type
    if kind == "cpu" and cpu_has_fast_bf16() is False and "cpu" not in _warned:
        _warned.add("cpu")
        logger.warning("mixed_precision=bf16 on a CPU without AMX or AVX512-BF16: bfloat16 products are emulated and "
                       "likely slower than float32; set mixed_precision: no")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)
