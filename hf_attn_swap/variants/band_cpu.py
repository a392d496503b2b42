"""The CPU attention kernels (``band_cpu.c``): built on first use, called through ctypes.

Two kernels share the library and its build: the band kernel (below) and the decode kernel
(:func:`decode_attention`: one new token per sequence against a long K/V cache, streaming K and V once, where SDPA
reads them at about half the memory's rate; AVX-512 where the CPU has it, else AVX2; see the C file for the
layout).

Inference-only fast path of sliding-window attention on x86-64 CPUs with AVX2/FMA in fp32 (see the C file for why
torch's SDPA cannot do this work). It is compiled once per source version with the system C compiler
(``$CC``, else ``cc``) into ``<cache>/kernels``, next to the fetched weights; nothing else is needed (no torch
headers, no ninja). Where it cannot be built or run (no compiler, no AVX2, another architecture, or
``HF_ATTN_SWAP_BAND_KERNEL=0``), :func:`available` is False and the callers use the SDPA path, which computes the
same thing. Tests hold the kernel to ``reference.reference_sliding_window``.

First-use cost: the first sliding-window forward that can use the kernel compiles it, about 1-2 s, once per source
version (one INFO line says so); later processes load the cached library.

Build safety, because the library is loaded into this process and runs with its rights:

- the compiler runs under a timeout (``HF_ATTN_SWAP_BUILD_TIMEOUT`` seconds, default 120) in its own process group,
  killed with everything it started on timeout or interrupt;
- builders take an ``fcntl`` lock in the kernels folder, so two processes never compile the same library at once;
- the compiler writes into a private temporary folder beside the target (also its ``TMPDIR``), the result is renamed
  into place, and the temporary folder is removed on any failure or interrupt;
- a kernels folder (or its parent) that other users can write to or that we do not own, and a library that we do not
  own or that others can write, are refused: the callers fall back to SDPA with one WARNING (group write is allowed
  only for a user private group, the Debian/Ubuntu default, which no other user belongs to);
- after a successful build, libraries built from other versions of the source are removed.
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
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..fetch import cache_dir

logger = logging.getLogger(__name__)

ENV = "HF_ATTN_SWAP_BAND_KERNEL"
TIMEOUT_ENV = "HF_ATTN_SWAP_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0  # a cold gcc takes 1-2 s; this only catches a hung or wedged toolchain
_SOURCE = Path(__file__).with_name("band_cpu.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_LOCK_NAME = ".band_cpu.lock"
_WORK_PREFIX = ".band_cpu-build-"


class KernelBuildError(RuntimeError):
    """The kernel could not be built or may not be loaded (compiler missing, failed or too slow; unsafe folder)."""


def _cpu_has_avx2_fma() -> bool:
    return unavailable_reason(check_compiler=False) is None


def _cpu_flags() -> set[str] | None:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def unavailable_reason(*, check_compiler: bool = True) -> str | None:
    """Why this machine cannot build or run the kernel, or None if it can.

    Args:
        check_compiler: also require the C compiler (``$CC``, else ``cc``) on PATH.

    Returns:
        One line (not x86-64, CPU without AVX2/FMA, no C compiler), or None.
    """
    machine = platform.machine()
    if machine.lower() not in {"x86_64", "amd64"}:
        return f"the band kernel needs an x86-64 CPU, this one is {machine or 'unknown'}"
    flags = _cpu_flags()
    if flags is None:
        return "cannot read /proc/cpuinfo to check for AVX2/FMA"
    missing = sorted({"avx2", "fma"} - flags)
    if missing:
        return f"the band kernel needs AVX2 and FMA, this CPU lacks {', '.join(missing)}"
    cc = os.environ.get("CC") or "cc"
    if check_compiler and shutil.which(cc) is None:
        return f"no C compiler: {cc!r} is not on PATH"
    return None


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise KernelBuildError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def _private_group(gid: int) -> bool:
    """A user private group (Debian/Ubuntu's default with umask 002): our own primary group, named after us, with no
    other members. Group write there lets no other user in, so it is not refused."""
    import grp  # POSIX only, like everything on the build path (the kernel itself needs /proc/cpuinfo)
    import pwd

    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return False
    return gid == os.getegid() and group.gr_name == user and set(group.gr_mem) <= {user}


def _others_can_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid)))


def _check_private(path: Path, what: str, *, allow_sticky: bool = False) -> None:
    """Refuse ``path`` if another user owns it or can write to it (they could swap the library we load)."""
    st = path.stat()
    if st.st_uid not in {os.geteuid(), 0}:
        raise KernelBuildError(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}): "
                               f"refusing to build or load the kernel there (set {ENV}=0 or fix the owner)")
    sticky = allow_sticky and st.st_mode & stat.S_ISVTX
    if _others_can_write(st) and not sticky:
        raise KernelBuildError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                               f"refusing to build or load the kernel there (chmod go-w it, or set {ENV}=0)")


def _check_library(lib: Path) -> None:
    st = lib.stat()
    if st.st_uid != os.geteuid() or _others_can_write(st):
        raise KernelBuildError(f"{lib} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; only a "
                               "library you own and nobody else can write is loaded (delete it to rebuild)")


@contextlib.contextmanager
def _build_lock(out_dir: Path, wait_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the kernels folder's lock file (per open file, so threads exclude too)."""
    import fcntl

    fd = os.open(out_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KernelBuildError(f"another process has been building the kernel in {out_dir} for over "
                                           f"{wait_s:g} s (lock {_LOCK_NAME}); set {ENV}=0 to skip it") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _sigint_held(held: list[int]):
    """Record Ctrl-C instead of raising it while the block runs (main thread only; elsewhere it cannot arrive).

    A KeyboardInterrupt raised inside ``subprocess.Popen`` after the fork, before it returns, would leave the
    compiler running with nobody holding its pid (CI caught it on a loaded machine: the shell had started, the
    parent was still in Popen's read of the exec pipe).
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:  # None: set outside Python
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _compile(cmd: list[str], work: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the compiler in its own process group; kill the whole group (cc1, as, ld) on timeout or interrupt."""
    env = {**os.environ, "TMPDIR": str(work)}  # its intermediate files land in ``work`` and go with it
    proc, held = None, []
    try:
        with _sigint_held(held):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
        if held:  # Ctrl-C came while Popen ran: deliver it again (to whatever handler was there) now that the
            signal.raise_signal(signal.SIGINT)  # group can be killed
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _remove_leftovers(out_dir: Path, keep: Path) -> None:
    """Remove other source versions' libraries and dead builds' work folders (called holding the lock)."""
    uid = os.geteuid()
    for old in out_dir.glob("band_cpu-*.so"):
        if old != keep and old.is_file() and old.stat().st_uid == uid:
            old.unlink(missing_ok=True)
            logger.debug("removed stale kernel build %s", old)
    for work in out_dir.glob(f"{_WORK_PREFIX}*"):
        # Only a process killed with SIGKILL leaves one, and no builder is running while we hold the lock.
        if work.is_dir() and work.stat().st_uid == uid:
            shutil.rmtree(work, ignore_errors=True)


def build(out_dir: Path | None = None, *, timeout: float | None = None) -> Path:
    """Compile ``band_cpu.c`` into ``<cache>/kernels/band_cpu-<hash>.so`` (a cache hit after the first call).

    Args:
        out_dir: where the library goes (default ``<cache>/kernels``; created private if missing).
        timeout: seconds the compiler may take (default ``$HF_ATTN_SWAP_BUILD_TIMEOUT`` or 120).

    Returns:
        The library's path.

    Raises:
        KernelBuildError: no C compiler, it failed or timed out, or the folder/library is not private to this user.
    """
    src = _SOURCE.read_bytes()
    cc = os.environ.get("CC") or "cc"
    tag = hashlib.sha256(src + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "kernels"
    lib = out_dir / f"band_cpu-{tag}.so"
    timeout = _timeout() if timeout is None else timeout
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(out_dir.resolve().parent, "the kernels folder's parent", allow_sticky=True)
    _check_private(out_dir, "the kernels folder")
    if lib.exists():
        _check_library(lib)
        return lib
    if shutil.which(cc) is None:
        raise KernelBuildError(f"no C compiler: {cc!r} is not on PATH (set $CC, or {ENV}=0 to use SDPA only)")
    with _build_lock(out_dir, wait_s=2 * timeout + 10):
        if lib.exists():  # another process built it while we waited
            _check_library(lib)
            return lib
        logger.info("building the band attention kernel with %s (about 1-2 s, once per source version) into %s",
                    cc, out_dir)
        work = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=out_dir))
        try:
            target = work / lib.name
            try:
                proc = _compile([cc, *_FLAGS, str(_SOURCE), "-o", str(target), "-lm"], work, timeout)
            except subprocess.TimeoutExpired:
                raise KernelBuildError(f"{cc} did not finish compiling {_SOURCE.name} within {timeout:g} s (killed; "
                                       f"set {TIMEOUT_ENV} to allow longer, or {ENV}=0 to use SDPA only)") from None
            if proc.returncode != 0 or not target.is_file():
                raise KernelBuildError(f"{cc} failed on {_SOURCE.name} (exit {proc.returncode}):\n"
                                       f"{proc.stderr[-2000:]}")
            target.chmod(0o755)
            os.replace(target, lib)  # same folder: atomic, a concurrent loader sees no library or a whole one
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _remove_leftovers(out_dir, keep=lib)
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV, "1").strip().upper() in {"0", "OFF", "NO", "FALSE"} or not _cpu_has_avx2_fma():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (KernelBuildError, OSError) as err:
        # lru_cache: one WARNING per process, then every caller takes the SDPA path.
        logger.warning("band attention kernel unavailable, sliding window uses SDPA blocks: %s", err)
        return None
    fn = lib.band_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_int64] * 12
                   + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
                   + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 8 + [ctypes.c_int])
    fn = lib.decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 15
                   + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int])
    lib.decode_attention_supported.restype = ctypes.c_int
    lib.decode_attention_supported.argtypes = [ctypes.c_int64]
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
    return _tensors_fit(query, key, value) and not _off and available()


def _tensors_fit(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """:func:`usable`'s checks on the tensors alone (what torch.compile can trace and guard on)."""
    tensors = (query, key, value)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
        and query.shape[-1] % 16 == 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
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


PROFILE_NAME = "hf_attn_swap::decode_attention"
DECODE_MAX_GROUP = 16  # query heads per KV head one block of the decode kernel holds (band_cpu.c: GMAX)


def decode_unavailable_reason() -> str | None:
    """Why the decode kernel cannot run on this machine (the band kernel's: not x86-64, no AVX2/FMA, no compiler), or
    None."""
    return unavailable_reason()


DECODE_ISAS = {"auto": 0, "avx2": 1, "avx512": 2}


@functools.lru_cache(maxsize=None)
def decode_available(head_dim: int, isa: str = "auto") -> bool:
    """Whether the decode kernel runs here for this head dim: the library builds (x86-64 with AVX2/FMA) and
    ``head_dim`` is a multiple of 32 (AVX2) or, for ``isa="avx512"``, of 64 on a CPU and OS with AVX-512F (which
    ``"auto"`` prefers). Elsewhere decode steps take torch's SDPA, which computes the same."""
    lib = _library()
    best = lib.decode_attention_supported(head_dim) if lib is not None else 0
    return best >= max(DECODE_ISAS[isa], 1)


def decode_usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` can take these tensors: one query per sequence, CPU fp32, at most 16 query
    heads per KV head, last dimensions contiguous, no autograd, and :func:`decode_available` for the head dim (the
    AVX-512 version where the CPU has it, else AVX2: both faster than SDPA here, results/decode_kernel.md)."""
    return (
        query.dim() == 4 and query.shape[2] == 1 and key.shape[2] >= 1
        and query.shape[1] % key.shape[1] == 0 and query.shape[1] // key.shape[1] <= DECODE_MAX_GROUP
        and _tensors_fit(query, key, value)
        and not _off  # a module global: torch.compile guards on it, so off() recompiles rather than being ignored
        and _decode_runs(query.shape[-1])
    )


@torch.compiler.assume_constant_result
def _decode_runs(head_dim: int) -> bool:
    """:func:`decode_available` as torch.compile sees it: a constant of the process, evaluated while tracing. Tracing
    into it instead would break the graph (the lru_cache'd build, /proc/cpuinfo, the ctypes load)."""
    return decode_available(head_dim)


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float,
    key_valid: torch.Tensor | None = None, isa: str = "auto",
) -> torch.Tensor:
    """One decode step of softmax attention: each sequence's query ``(b, H, 1, d)`` attends to the keys of
    ``key``/``value`` (``(b, H_kv, n, d)``) that ``key_valid`` (bool ``(b or 1, n)``, None: all) allows; the
    ``H / H_kv`` query heads of a KV head share it, without repeated K/V. K and V are read once, in order.

    Returns:
        ``(b, 1, H, d)``, the layout transformers' attention functions return. A sequence that sees no key gets
        zeros. ``isa``: ``"auto"`` (AVX-512 where it runs, else AVX2), ``"avx2"`` or ``"avx512"`` (tests hold each to
        the reference).
    """
    if isa not in DECODE_ISAS:
        raise ValueError(f"decode_attention: isa must be one of {sorted(DECODE_ISAS)}, got {isa!r}")
    b, h, m, d = query.shape
    h_kv, n = key.shape[1], key.shape[2]
    if not (m == 1 and key.shape[0] == b and key.shape[-1] == d and value.shape == key.shape and h % h_kv == 0
            and h // h_kv <= DECODE_MAX_GROUP and d % 32 == 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1
                    for t in (query, key, value))):
        raise ValueError("decode_attention: query (b, H, 1, d), key and value (b, H_kv, n, d), CPU float32 with a "
                         f"contiguous last dimension, d a multiple of 32, H / H_kv <= {DECODE_MAX_GROUP}; got "
                         f"q{tuple(query.shape)} k{tuple(key.shape)} v{tuple(value.shape)} {query.dtype}")
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.dim() != 2
                                  or key_valid.shape[0] not in (1, b) or key_valid.shape[1] != n):
        raise ValueError(f"decode_attention: key_valid must be bool (b or 1, n) = ({b} or 1, {n}), got "
                         f"{key_valid.dtype} {tuple(key_valid.shape)}")
    if not decode_available(d, isa):
        raise RuntimeError(f"the decode kernel's {isa} version does not run here for head dim {d} (see "
                           f"band_cpu.decode_available()); {ENV}={os.environ.get(ENV)!r}")
    return decode_attention_unchecked(query, key, value, scale, key_valid, isa=DECODE_ISAS[isa])


def decode_attention_unchecked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                               key_valid: torch.Tensor | None, isa: int = 0) -> torch.Tensor:
    """:func:`decode_attention` without its checks, for callers that have just asked :func:`decode_usable` (a decode
    step calls this once per layer, where the checks would cost about as much as the kernel at short contexts)."""
    b, h, _, d = query.shape
    h_kv, n = key.shape[1], key.shape[2]
    valid_ptr, valid_sb = None, 0
    if key_valid is not None:
        if key_valid.stride(-1) != 1:
            key_valid = key_valid.contiguous()
        key_valid = key_valid.view(torch.uint8)  # same bytes: the C side reads 0 / 1
        valid_ptr, valid_sb = key_valid.data_ptr(), key_valid.stride(0) if key_valid.shape[0] > 1 else 0
    out = query.new_empty(b, 1, h, d)
    args = (query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), b, h, h_kv, n, d,
            query.stride(0), query.stride(1), *key.stride()[:3], *value.stride()[:3], out.stride(0), out.stride(2),
            valid_ptr, valid_sb, float(scale), isa, torch.get_num_threads())
    if _profiling():  # named for torch.profiler (eval/step_profile.py counts it as attention): ctypes is no operator
        with torch.profiler.record_function(PROFILE_NAME):
            rc = _library().decode_attention_f32(*args)
    else:
        rc = _library().decode_attention_f32(*args)
    if rc != 0:
        raise RuntimeError(f"decode_attention kernel failed (code {rc}) on q{tuple(query.shape)} k{tuple(key.shape)}")
    return out


def _profiling() -> bool:
    # torch's own flag (private, so if it goes away every call is named: correct, ~5 us slower)
    flag = getattr(torch.autograd.profiler, "_is_profiler_enabled", True)
    return bool(flag)
