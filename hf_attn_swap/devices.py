"""Where and in what precision a command runs: device and dtype names checked before anything loads.

``eval``, ``convert`` and ``uptrain`` take ``device`` (``auto``, the default: the GPU when there is one; ``cpu``,
``cuda``, ``cuda:1``, ``mps``) and ``dtype`` (``float32``,
``bfloat16``, ``float16``) as strings. :func:`resolve` turns them into torch objects or raises ONE ``ValueError``
line saying what is allowed here: CUDA asked for where there is none, a device index past the last one, an unknown
dtype name, or a dtype the device cannot compute in. The last is probed, not assumed: a small matmul, softmax and SDPA
call run in that dtype on that device (older torch CPU builds had no float16 matmul; torch 2.13 on an AVX2 CPU runs
both half dtypes, slowly).
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

#: dtype names accepted by the commands and configs, with the short forms people type.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def available_devices() -> list[str]:
    """Device names that can run here, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name (or a torch dtype among :data:`DTYPES`) as a torch dtype; ``ValueError`` listing the allowed."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = DTYPE_ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in DTYPES:
        allowed = ", ".join(list(DTYPES) + [f"{a} (= {b})" for a, b in DTYPE_ALIASES.items()])
        raise ValueError(f"unknown dtype {name!r}; allowed: {allowed}")
    return DTYPES[key]


def auto_device() -> torch.device:
    """The device ``auto`` means here: this process's CUDA device (``LOCAL_RANK`` under ``accelerate launch`` /
    ``torchrun``, else the first), else Apple MPS, else the CPU. ``accelerate launch --cpu`` keeps it on the CPU."""
    import os

    cpu_forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not cpu_forced:
        rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available() and not cpu_forced:
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A device name as a torch device that exists here; ``ValueError`` saying what is available otherwise.

    ``auto`` (and None) picks :func:`auto_device`: the GPU when there is one, so a user with a GPU need not say so.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return auto_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps (available here: "
                         f"{', '.join(available_devices())})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device={str(name)!r} needs CUDA, but {why}; available here: "
                             f"{', '.join(available_devices())}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(name)!r} does not exist ({torch.cuda.device_count()} CUDA device(s)); "
                             f"available here: {', '.join(available_devices())}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={str(name)!r} needs Apple MPS, which is not available; available here: "
                             f"{', '.join(available_devices())}")
    elif device.type != "cpu":
        raise ValueError(f"device={str(name)!r} is not supported; allowed: auto, cpu, cuda, cuda:N, mps (available "
                         f"here: {', '.join(available_devices())})")
    return device


@functools.lru_cache(maxsize=None)
def _probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the ops every model runs work in ``dtype`` on ``device``; else the error they raised."""
    try:
        x = torch.ones(4, 8, 8, dtype=dtype, device=device)
        y = torch.matmul(x, x.transpose(-1, -2))
        torch.softmax(y, dim=-1)
        torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None], is_causal=True)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def resolve(device: str | torch.device, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Check ``device`` and ``dtype`` together; ``(torch.device, torch.dtype)`` or ONE ``ValueError`` line.

    Raises:
        ValueError: an unknown dtype (lists the allowed names), a device that is not here (lists those that are),
            or a dtype the device cannot compute in (lists the dtypes it can).
    """
    dt = resolve_dtype(dtype)
    dev = resolve_device(device)
    err = _probe(dev, dt)
    if err is not None:
        ok = [n for n, d in DTYPES.items() if _probe(dev, d) is None]
        raise ValueError(f"dtype={dtype_name(dt)} cannot run on {dev} here ({err}); allowed here: {', '.join(ok)}")
    return dev, dt


__all__ = ["DTYPES", "auto_device", "available_devices", "dtype_name", "resolve", "resolve_device", "resolve_dtype"]


#: the package-level name of :func:`resolve` (``hf_attn_swap.resolve_device_dtype``).
resolve_device_dtype = resolve
