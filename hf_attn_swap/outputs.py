"""Output folders: before any work starts, check that a command may write where it was told to.

Every writer (``save_swapped``, ``hf-attn-swap convert --out``, ``eval --out``, ``uptrain``'s ``output_dir``) calls
:func:`check_output_dir` first, so a bad path costs nothing (no model loaded, no conversion run) and never ends in a
traceback half-way. The rules, by ``kind``:

- ``"checkpoint"`` (``save_swapped``): the folder is replaced as a whole, so it must be missing or empty, or hold a
  previous checkpoint of ours and nothing else (replaced only with ``overwrite=True``). A folder with anything a
  checkpoint did not write is always refused: saving would delete it.
- ``"eval"`` (``run_comparison``): only its own report files are written, nothing is deleted. A folder with a
  previous comparison (``results.json``) is rewritten; any other non-empty folder needs ``overwrite=True``.
- ``"run"`` (``uptrain``): writes ``stage1/``, ``final/``, ``checkpoint-*/`` and ``uptrain_result.json``. A previous
  run is continued with ``resume`` or started over with ``overwrite=True``; any other non-empty folder needs
  ``overwrite=True`` (its files are left alone).

Every kind refuses a path under a regular file and a place the user cannot write (checked with ``os.access`` on the
nearest existing folder; note that for root ``os.access`` allows nearly everything).
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

__all__ = ["CHECKPOINT_KIND", "EVAL_KIND", "RUN_KIND", "OutputDirError", "check_output_dir", "checkpoint_files"]

CHECKPOINT_KIND, EVAL_KIND, RUN_KIND = "checkpoint", "eval", "run"
_KINDS = (CHECKPOINT_KIND, EVAL_KIND, RUN_KIND)

SIDECAR = "hf_attn_swap.json"  # checkpoint.SIDECAR; repeated here so this module imports nothing heavy
# Files save_pretrained / tokenizers write, used to recognise a plain transformers checkpoint or one saved by an older
# version of this package (whose sidecar does not list its files).
_CHECKPOINT_PATTERNS = (
    SIDECAR, "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)
_WEIGHTS_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")
_RUN_ENTRIES = ("uptrain_result.json", "stage1", "final")


class OutputDirError(ValueError):
    """An output folder that a command may not write to (one line saying why and what to do)."""


def _names(folder: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())


def _show(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def checkpoint_files(folder: Path) -> set[str] | None:
    """The names a checkpoint in ``folder`` consists of, or None if ``folder`` holds no checkpoint.

    A checkpoint is ours when it has our sidecar, or is a transformers checkpoint (``config.json`` plus weights).
    A sidecar that lists its files (format 2) is trusted for the list; otherwise the usual transformers file names are.
    """
    entries = {p.name for p in folder.iterdir()}
    has_weights = any(fnmatch.fnmatch(n, pat) for n in entries for pat in _WEIGHTS_PATTERNS)
    if SIDECAR not in entries and not ("config.json" in entries and has_weights):
        return None
    try:
        listed = json.loads((folder / SIDECAR).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list) and all(isinstance(n, str) for n in listed):
        return {SIDECAR, *listed}
    return {n for n in entries if any(fnmatch.fnmatch(n, pat) for pat in _CHECKPOINT_PATTERNS)}


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _check_place(path: Path, kind: str) -> None:
    """A folder path (not under a file) in a place the user can write."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} is a file, not a folder: choose a folder path for the {kind} output")
    anchor = _nearest_existing(path.parent if path.exists() else path)
    if not anchor.is_dir():
        raise OutputDirError(f"cannot create {path}: {anchor} is a file, not a folder")
    # A checkpoint is written beside the target and renamed into place: the parent must be writable. Other kinds
    # write inside the folder (or create it inside the nearest existing parent).
    if kind == CHECKPOINT_KIND:
        need = _nearest_existing(path.parent)
    else:
        need = path if path.exists() else anchor
    if not os.access(need, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write in {need} (permission denied): choose a folder you can write to")


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False, kind: str = CHECKPOINT_KIND,
                     resume: bool = False) -> Path:
    """Check, before any work, that a command may write its ``kind`` of output to ``path``; change nothing.

    Args:
        path: the output folder (need not exist).
        overwrite: replace a previous checkpoint of ours (``"checkpoint"``), or write into a non-empty folder
            (``"eval"``, ``"run"``: only their own files are written, nothing there is deleted).
        kind: ``"checkpoint"`` (``save_swapped``), ``"eval"`` (``run_comparison``) or ``"run"`` (``uptrain``).
        resume: (``"run"``) the command continues the run already in the folder.

    Returns:
        ``path`` as a Path.

    Raises:
        OutputDirError: (a ValueError) the path is a file or under one, the place is not writable, or the folder holds
            files the command must not replace; the message names them and says what to do.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(_KINDS)}")
    path = Path(path)
    if not str(path).strip():
        raise OutputDirError("the output folder is empty (''): give a folder path")
    _check_place(path, kind)
    if not path.exists() or not any(path.iterdir()):
        return path
    names = _names(path)
    if kind == CHECKPOINT_KIND:
        ours = checkpoint_files(path)
        foreign = names if ours is None else [n for n in names if n.rstrip("/") not in ours]
        if foreign:
            what = "is not a checkpoint" if ours is None else "holds files a checkpoint did not write"
            raise OutputDirError(
                f"{path} {what} ({_show(foreign)}); saving replaces the whole folder and would delete them, even with "
                "overwrite: choose an empty or new folder, or move them out"
            )
        if not overwrite:
            raise OutputDirError(f"{path} already holds a checkpoint ({_show(names)}): pass --overwrite "
                                 "(overwrite=True) to replace it, or choose an empty or new folder")
        return path
    if kind == EVAL_KIND:
        if "results.json" in names or overwrite:
            return path  # a previous comparison's reports are rewritten; other files are never touched
        raise OutputDirError(f"{path} is not empty and holds no previous comparison ({_show(names)}): pass "
                             "--overwrite (overwrite=True) to write the reports beside these files, or choose an "
                             "empty or new folder")
    previous = [n for n in names if n.rstrip("/") in _RUN_ENTRIES or fnmatch.fnmatch(n, "checkpoint-*/")]
    if previous:
        if resume or overwrite:
            return path
        raise OutputDirError(f"{path} holds a previous run ({_show(previous)}): pass --resume to continue it, "
                             "--overwrite (overwrite=True) to start over in it, or choose an empty or new folder")
    if overwrite:
        return path
    raise OutputDirError(f"{path} is not empty and holds no run of ours ({_show(names)}): pass --overwrite "
                         "(overwrite=True) to write beside these files (they are left alone), or choose an empty or "
                         "new folder")
