"""The CPU band-attention kernel (``band_cpu.c``): built on first use, called through ctypes.

Inference-only fast path of sliding-window attention on x86-64 CPUs with AVX2/FMA in fp32 (see the C file for why
torch's SDPA cannot do this work). It is compiled once per source version with the system C compiler
(``$CC``, else ``cc``) into the package cache, next to the fetched weights; nothing else is needed (no torch
headers, no ninja). Where it cannot be built or run (no compiler, no AVX2, another architecture, or
``HF_ATTN_SWAP_BAND_KERNEL=0``), :func:`available` is False and the callers use the SDPA path, which computes the
same thing. Tests hold the kernel to ``reference.reference_sliding_window``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..fetch import cache_dir

logger = logging.getLogger(__name__)

ENV = "HF_ATTN_SWAP_BAND_KERNEL"
_SOURCE = Path(__file__).with_name("band_cpu.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


class KernelBuildError(RuntimeError):
    """The C compiler failed on band_cpu.c (its output is in the message)."""


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def build(out_dir: Path | None = None) -> Path:
    """Compile ``band_cpu.c`` into ``<cache>/kernels/band_cpu-<hash>.so`` (a cache hit after the first call).

    Raises:
        KernelBuildError: no C compiler, or it failed.
    """
    src = _SOURCE.read_bytes()
    cc = os.environ.get("CC") or "cc"
    tag = hashlib.sha256(src + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir() / "kernels"
    lib = out_dir / f"band_cpu-{tag}.so"
    if lib.exists():
        return lib
    if shutil.which(cc) is None:
        raise KernelBuildError(f"no C compiler: {cc!r} is not on PATH (set $CC, or {ENV}=0 to use SDPA only)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: concurrent first uses (pytest workers) never see half a library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    proc = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"{cc} failed on {_SOURCE.name}:\n{proc.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV, "1").strip().upper() in {"0", "OFF", "NO", "FALSE"} or not _cpu_has_avx2_fma():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (KernelBuildError, OSError) as err:
        logger.warning("band attention kernel unavailable, sliding window uses SDPA blocks: %s", err)
        return None
    fn = lib.band_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_int64] * 12
                   + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
                   + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 8 + [ctypes.c_int])
    return lib


_off = 0  # > 0 inside off(): callers take the SDPA path


@contextlib.contextmanager
def off():
    """Inside this block the kernel is not used (to measure or test the SDPA path it replaces)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def available() -> bool:
    """Whether the kernel is built and this CPU can run it (builds it on first call)."""
    return _library() is not None


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`band_attention` can take these tensors: CPU fp32, head dim a multiple of 16, last dimension
    contiguous, and no autograd (the kernel has no backward)."""
    tensors = (query, key, value)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
        and query.shape[-1] % 16 == 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not _off
        and available()
    )


def band_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, q_offset: int, window: int,
    scale: float, out: torch.Tensor | None = None, want_lse: bool = False,
    sink_key: torch.Tensor | None = None, sink_value: torch.Tensor | None = None, key_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sliding-window attention: query ``i`` (``(b, H, m, d)``) sits at key index ``q_offset + i`` of
    ``key``/``value`` (``(b, H_kv, n, d)``) and sees keys ``j`` with ``index - window < j <= index``.

    Args:
        out: ``(b, H, m, d)`` to write into (any strides with a contiguous last dimension), else a new tensor.
        want_lse: also return the natural log-sum-exp of each query's scores, ``(b, H, m)``.
        sink_key, sink_value: ``(b, H_kv, S, d)``, the keys at positions ``0 .. S-1``, seen by every query whose
            window has left them behind. ``key`` then starts at position ``key_start`` (a bounded cache keeps the
            sinks apart); when the sinks are ``key``'s own first entries, ``key_start`` is 0.

    Returns:
        ``(out, lse or None)``. Call only when :func:`usable` is True.
    """
    b, h, m, d = query.shape
    h_kv, n = key.shape[1], key.shape[2]
    # The C side trusts pointers and strides: anything else here would read or write out of bounds.
    if not (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1
                for t in (query, key, value, *(() if out is None else (out,))))
            and d % 16 == 0 and key.shape[0] == b and key.shape[-1] == d and value.shape == key.shape):
        raise ValueError("band_attention: query (b, H, m, d), key and value (b, H_kv, n, d), all CPU float32 with a "
                         f"contiguous last dimension and d a multiple of 16; got q{tuple(query.shape)} "
                         f"k{tuple(key.shape)} v{tuple(value.shape)} {query.dtype}")
    if not (0 <= q_offset and q_offset + m <= n) or h % h_kv:
        raise ValueError(f"band_attention: need 0 <= q_offset and q_offset + queries <= keys and heads divisible "
                         f"by KV heads, got q_offset={q_offset}, queries={m}, keys={n}, heads={h}/{h_kv}")
    if out is None:
        out = query.new_empty(b, h, m, d)
    elif out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError(f"band_attention: out must be {tuple(query.shape)} with a contiguous last dimension")
    lse = query.new_empty(b, h, m) if want_lse else None
    if sink_key is None:
        sink_key = sink_value = key[:, :, :0]
    n_sinks = sink_key.shape[2]
    if n_sinks and not (sink_key.shape[:2] == key.shape[:2] and sink_value.shape == sink_key.shape
                        and sink_key.stride(-1) == 1 and sink_value.stride(-1) == 1
                        and (key_start == 0 or key_start >= n_sinks)):
        raise ValueError("band_attention: sink_key/sink_value must be (b, H_kv, S, d) with a contiguous last "
                         f"dimension, and key must start at 0 or after the sinks (key_start={key_start}, S={n_sinks})")
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the band kernel is not available here (see band_cpu.available() and the log); "
                           f"{ENV}={os.environ.get(ENV)!r}")
    rc = lib.band_attention_f32(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), lse.data_ptr() if lse is not None else None,
        b, h, h_kv, m, n, d, *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
        q_offset, window, float(scale),
        sink_key.data_ptr() if n_sinks else None, sink_value.data_ptr() if n_sinks else None, n_sinks,
        *sink_key.stride()[:3], *sink_value.stride()[:3], key_start, torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"band_attention kernel failed (code {rc}) on q{tuple(query.shape)} k{tuple(key.shape)}")
    return out, lse
