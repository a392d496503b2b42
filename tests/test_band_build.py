"""How the band kernel is built: timeout, lock, atomic rename, cleanup, private folders, stale builds.

A fake compiler (a shell script set as ``$CC``) stands in for gcc so each failure can be injected: it records its
pid, leaves a scratch file in ``$TMPDIR`` and a partial output, then sleeps, fails or finishes. These tests need no
AVX2 and no real compiler; the kernel's numerics are in test_band_kernel.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hf_attn_swap.variants import band_cpu

LOCK = band_cpu._LOCK_NAME

FAKE_CC = """#!/bin/sh
out=""
prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
echo "start $$" >> "{log}"
echo scratch > "$TMPDIR/cc-scratch.o"
echo partial > "$out"
sleep {sleep} &
echo $! > "{pidfile}"
wait
if [ "{fail}" = "1" ]; then echo "error: band_cpu.c:1: injected failure" >&2; exit 1; fi
echo "a whole library" > "$out"
echo "end $$" >> "{log}"
"""


class FakeCC:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, *, sleep: float = 0, fail: bool = False):
        self.log, self.pidfile = root / "cc.log", root / "cc.pid"
        self.path = root / "fake-cc"
        self.path.write_text(FAKE_CC.format(log=self.log, pidfile=self.pidfile, sleep=sleep, fail=int(fail)))
        self.path.chmod(0o755)
        monkeypatch.setenv("CC", str(self.path))

    def runs(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def sleeper_pid(self) -> int:
        return int(self.pidfile.read_text())


def _alive(pid: int) -> bool:
    """A zombie (killed, not yet reaped by init in a container) counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_build_logs_its_cost_once_and_hits_the_cache_after(tmp_path, monkeypatch, caplog):
    cc = FakeCC(tmp_path, monkeypatch)
    out = tmp_path / "kernels"
    with caplog.at_level(logging.INFO, logger=band_cpu.__name__):
        lib = band_cpu.build(out)
        band_cpu.build(out)
    assert lib.read_text() == "a whole library\n" and lib.parent == out
    assert len(cc.runs()) == 2  # one start, one end: the second call was a cache hit
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "1-2 s" in infos[0] and str(cc.path) in infos[0]
    assert _listing(out) == sorted([LOCK, lib.name])  # the work folder and scratch files are gone
    assert (out.stat().st_mode & 0o077) == 0  # created private


def test_timeout_kills_the_compiler_and_leaves_no_temp_file(tmp_path, monkeypatch):
    cc = FakeCC(tmp_path, monkeypatch, sleep=60)
    out = tmp_path / "kernels"
    t = time.monotonic()
    with pytest.raises(band_cpu.KernelBuildError, match=rf"{cc.path} did not finish .* within 0.5 s .*killed"):
        band_cpu.build(out, timeout=0.5)
    assert time.monotonic() - t < 10
    assert _listing(out) == [LOCK]  # no partial library, no temp folder, no compiler scratch
    assert _wait_dead(cc.sleeper_pid()), "the compiler's child survived the timeout"


def test_timeout_from_the_environment_and_bad_values(tmp_path, monkeypatch):
    FakeCC(tmp_path, monkeypatch, sleep=60)
    monkeypatch.setenv(band_cpu.TIMEOUT_ENV, "0.3")
    with pytest.raises(band_cpu.KernelBuildError, match="within 0.3 s"):
        band_cpu.build(tmp_path / "k")
    monkeypatch.setenv(band_cpu.TIMEOUT_ENV, "soon")
    with pytest.raises(band_cpu.KernelBuildError, match=rf"{band_cpu.TIMEOUT_ENV}='soon': expected a number"):
        band_cpu.build(tmp_path / "k")


def test_interrupted_build_leaves_no_temp_file(tmp_path, monkeypatch):
    """Ctrl-C while the compiler runs: the compiler's group is killed and nothing is left in the kernels folder.

    The build runs in a child Python that gets a real SIGINT, as a user's Ctrl-C would arrive. (Sending SIGINT to
    pytest's own main thread made this test depend on what earlier tests had done to the process: it passed alone
    and failed inside the whole suite, the interrupt arriving only after the compiler's 60 s; something earlier in
    the suite leaves SIGINT ignored or blocked, which a child would inherit too, hence the reset in the child.)
    """
    cc = FakeCC(tmp_path, monkeypatch, sleep=60)
    out = tmp_path / "kernels"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-c",
         # a fresh process as a user's shell starts it: Ctrl-C raises KeyboardInterrupt. (Dispositions are inherited
         # through exec, and inside the whole suite this pytest process has SIGINT ignored or blocked by then.)
         "import signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
         "signal.signal(signal.SIGINT, signal.default_int_handler); from pathlib import Path; "
         "from hf_attn_swap.variants import band_cpu; band_cpu.build(Path(sys.argv[1]), timeout=60)", str(out)],
        env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (cc.pidfile.exists() and cc.pidfile.read_text().strip()):  # the compiler runs, its output is partial
        assert child.poll() is None and time.monotonic() < deadline, "the fake compiler never started"
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert _listing(out) == [LOCK]
    assert _wait_dead(cc.sleeper_pid())


def test_interrupt_inside_popen_still_kills_the_compiler(tmp_path, monkeypatch):
    """Ctrl-C after the fork but before ``Popen`` returns: the interrupt is delivered once the pid is known.

    Injected by a Popen that receives SIGINT itself after starting the compiler (CI once hit this window on a loaded
    machine: the compiler outlived the interrupted build). Runs in a child Python for the reason given above.
    """
    cc = FakeCC(tmp_path, monkeypatch, sleep=60)
    out = tmp_path / "kernels"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    code = (
        "import os, signal, subprocess, sys, time; from pathlib import Path\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "real = subprocess.Popen\n"
        "class InterruptedPopen(real):\n"
        "    def __init__(self, *a, **k):\n"
        "        super().__init__(*a, **k)\n"
        "        if a[0][0] != os.environ['CC']: return  # other tools (ldconfig from ctypes) run as usual\n"
        "        pidfile = Path(sys.argv[2])\n"
        "        while not (pidfile.exists() and pidfile.read_text().strip()): time.sleep(0.01)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        for _ in range(100): time.sleep(0.001)  # bytecode boundaries: a live handler runs here\n"
        "subprocess.Popen = InterruptedPopen\n"
        "from hf_attn_swap.variants import band_cpu\n"
        "band_cpu.build(Path(sys.argv[1]), timeout=60)\n")
    child = subprocess.run([sys.executable, "-c", code, str(out), str(cc.pidfile)], env=env, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in child.stderr, child.stderr[-2000:]
    assert _listing(out) == [LOCK]
    assert _wait_dead(cc.sleeper_pid()), "the compiler outlived an interrupt that came inside Popen"


def test_compiler_failure_names_the_compiler_and_cleans_up(tmp_path, monkeypatch):
    cc = FakeCC(tmp_path, monkeypatch, fail=True)
    out = tmp_path / "kernels"
    with pytest.raises(band_cpu.KernelBuildError, match=rf"(?s){cc.path} failed on band_cpu.c.*injected failure"):
        band_cpu.build(out)
    assert _listing(out) == [LOCK]


def test_two_builders_in_threads_compile_once(tmp_path, monkeypatch):
    cc = FakeCC(tmp_path, monkeypatch, sleep=1)
    out = tmp_path / "kernels"
    barrier, results, errors = threading.Barrier(2), [], []

    def builder():
        barrier.wait()
        try:
            results.append(band_cpu.build(out))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors and len(results) == 2 and results[0] == results[1]
    # Without the lock both would have seen no library and compiled: two starts.
    assert [line.split()[0] for line in cc.runs()] == ["start", "end"]


def test_build_waits_for_another_process_holding_the_lock(tmp_path, monkeypatch):
    cc = FakeCC(tmp_path, monkeypatch)
    out = tmp_path / "kernels"
    out.mkdir(mode=0o700)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT, 0o600); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(1.5)", str(out / LOCK)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.monotonic()
        band_cpu.build(out)
        waited = time.monotonic() - t
    finally:
        holder.wait(10)
    assert waited > 1.0, f"built after {waited:.2f} s while another process held the lock"
    assert len(cc.runs()) == 2


def test_world_writable_cache_is_refused_and_the_kernel_falls_back(tmp_path, monkeypatch, caplog):
    FakeCC(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(cache))
    with pytest.raises(band_cpu.KernelBuildError, match="writable by other users .*mode 777"):
        band_cpu.build()
    assert not list((cache / "kernels").glob("*.so"))
    cache.chmod(0o755)
    (cache / "kernels").chmod(0o757)  # the kernels folder itself, world-writable
    with pytest.raises(band_cpu.KernelBuildError, match="kernels folder .* writable by other users"):
        band_cpu.build()
    (cache / "kernels").chmod(0o700)
    if band_cpu.unavailable_reason(check_compiler=False) is None:
        cache.chmod(0o777)
        band_cpu._library.cache_clear()
        try:
            with caplog.at_level(logging.WARNING, logger=band_cpu.__name__):
                assert not band_cpu.available()
                assert not band_cpu.available()
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "uses SDPA blocks" in warnings[0] and "writable by other" in warnings[0]
        finally:
            band_cpu._library.cache_clear()


def test_library_others_can_write_is_refused(tmp_path, monkeypatch):
    FakeCC(tmp_path, monkeypatch)
    lib = band_cpu.build(tmp_path / "kernels")
    lib.chmod(0o666)
    with pytest.raises(band_cpu.KernelBuildError, match="only a library you own and nobody else can write"):
        band_cpu.build(tmp_path / "kernels")
    assert lib.exists()  # refused, not deleted: we may not have written it


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_library_or_folder_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    FakeCC(tmp_path, monkeypatch)
    out = tmp_path / "kernels"
    lib = band_cpu.build(out)
    os.chown(lib, 65534, -1)
    with pytest.raises(band_cpu.KernelBuildError, match="owned by uid 65534"):
        band_cpu.build(out)
    os.chown(lib, 0, -1)
    os.chown(out, 65534, -1)
    with pytest.raises(band_cpu.KernelBuildError, match="kernels folder .* owned by uid 65534, not by you"):
        band_cpu.build(out)


def test_stale_builds_and_dead_work_folders_are_removed_after_a_build(tmp_path, monkeypatch):
    FakeCC(tmp_path, monkeypatch)
    out = tmp_path / "kernels"
    out.mkdir(mode=0o700)
    stale = out / "band_cpu-0123456789abcdef.so"
    stale.write_text("old source version")
    dead = out / f"{band_cpu._WORK_PREFIX}killed"
    dead.mkdir()
    (dead / "band_cpu-x.so").write_text("half")
    (out / "notes.txt").write_text("not ours")
    lib = band_cpu.build(out)
    assert _listing(out) == sorted([LOCK, lib.name, "notes.txt"])


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(band_cpu.platform, "machine", lambda: "aarch64")
    assert "x86-64" in band_cpu.unavailable_reason() and "aarch64" in band_cpu.unavailable_reason()
    monkeypatch.setattr(band_cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(band_cpu, "_cpu_flags", lambda: {"sse2", "avx", "fma"})
    assert band_cpu.unavailable_reason() == "the band kernel needs AVX2 and FMA, this CPU lacks avx2"
    assert not band_cpu._cpu_has_avx2_fma()
    monkeypatch.setattr(band_cpu, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert "no C compiler" in band_cpu.unavailable_reason()
    assert band_cpu.unavailable_reason(check_compiler=False) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another group needs root")
def test_group_write_is_refused_unless_the_group_is_private(tmp_path, monkeypatch):
    FakeCC(tmp_path, monkeypatch)
    out = tmp_path / "kernels"
    out.mkdir()
    out.chmod(0o775)
    own_group_is_private = band_cpu._private_group(os.getegid())
    if own_group_is_private:  # e.g. root:root here, or alice:alice with umask 002 on Ubuntu
        assert band_cpu.build(out).exists()
    os.chown(out, -1, 65534)  # nogroup: other users may be in it
    with pytest.raises(band_cpu.KernelBuildError, match="kernels folder .* writable by other users .*mode 775"):
        band_cpu.build(out)
