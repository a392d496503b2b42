"""Save and load swapped models.

``save_swapped`` writes a normal ``save_pretrained`` directory plus a small sidecar, ``hf_attn_swap.json``, that
records every swap step. Where the result has a vanilla transformers form (a llama-family GQA conversion: the config's
``num_key_value_heads`` says it all; or a variant's ``vanilla_export``), the directory also loads with plain
``from_pretrained`` in a process that never imports this package. Where it has none (GPT-2 / GPT-NeoX / BERT with fewer
KV heads, attention-only variants), :func:`load_swapped` restores it exactly: it builds the model from its config,
replays the recorded steps shape-only, checks every tensor shape against the weights file, and loads the weights.

Saves are atomic: the directory is written beside the target and renamed into place, so an interrupted save leaves
either the previous directory or none, never a directory that loads as a different model. The target is checked
before any work (:func:`hf_attn_swap.outputs.check_output_dir`): a folder holding anything a checkpoint did not write
is never replaced, and a previous checkpoint only with ``overwrite=True``.

Integrity (sidecar format 2): the sidecar records the sha256 of ``config.json``, of every weights file and of its own
content (without that hash), plus the list of files the save wrote. :func:`load_swapped` verifies them all before
building anything, so a truncated, edited or replaced file is an error naming the file and the mismatch, not a model
with a silently different window or different weights. Hashing costs about a second per GB on load. Format-1
sidecars (no hashes) still load, with a WARNING that they cannot be verified.

A checkpoint that only the sidecar can describe (not vanilla-loadable) also carries an ``"hf_attn_swap"`` entry in
its ``config.json`` (transformers keeps unknown config keys, so vanilla loading still works). :func:`load_swapped`
reads it to refuse loading such a folder as a plain model when its sidecar is missing (``allow_plain=True`` loads it
anyway, with a WARNING). Plain ``AutoModelForCausalLM.from_pretrained`` cannot be made to warn: it loads such a
folder with the original attention (or fails on the weights' shapes); the entry's ``note`` says so to anyone reading
the config.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from transformers import AutoConfig

from . import __version__
from .api import RECORD_ATTR, SwapRecord, SwapStep, _apply_plan, _plan, swap_record
from .convert.adapters import get_adapter
from .outputs import CHECKPOINT_KIND, check_output_dir
from .hf_compat import attn_implementation, make_v4_loadable, no_init_weights, set_attn_implementation
from .registry import get_variant
from .variants.linear import require_feature_map_state

logger = logging.getLogger(__name__)

SIDECAR = "hf_attn_swap.json"
FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # 1: before hashes (loads unverified, with a WARNING)
CONFIG_MARK = "hf_attn_swap"  # config.json entry of a checkpoint that needs its sidecar
_SELF_HASH = "sidecar_sha256"
# Files whose sha256 the sidecar records and load_swapped verifies: what loading reads.
_HASHED = ("config.json", "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
           "pytorch_model.bin.index.json")


class SidecarMismatchError(ValueError):
    """The sidecar's recorded swap does not build the tensors stored in the weights file."""


class CheckpointIntegrityError(SidecarMismatchError):
    """A checkpoint file is missing, unreadable, or not the one that was saved (its sha256 differs)."""


def _vanilla_form(model: nn.Module) -> tuple[Any, dict[str, torch.Tensor] | None, bool, set[int]]:
    """(config to write, state dict to write instead of the model's or None, vanilla-loadable?, exported steps)."""
    record = swap_record(model)
    if record is None:
        return model.config, None, True, set()
    config, state, exported = model.config, None, set()
    for i, step in enumerate(record.steps):
        if step.vanilla:
            continue  # e.g. GQA on llama: the saved num_key_value_heads is the whole story
        spec = get_variant(step.variant)
        form = spec.vanilla_export(model, step) if spec.vanilla_export is not None else None
        if form is None or exported:
            # No vanilla form, or two steps each wanting their own: only the sidecar can describe it.
            return model.config, None, False, set()
        config, state = form if isinstance(form, tuple) else (form, None)
        exported.add(i)
    return config, state, True, exported


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:  # hashlib.file_digest is 3.11+; the package supports 3.10
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_digest(sidecar: dict[str, Any]) -> str:
    """sha256 of the sidecar's content without its own hash; formatting (indentation, key order) does not count."""
    body = {k: v for k, v in sidecar.items() if k != _SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _mark_config(file: Path, record: SwapRecord | None, needs_sidecar: bool) -> None:
    """Add (or drop a stale) ``"hf_attn_swap"`` entry in config.json: this folder needs its sidecar."""
    data = json.loads(file.read_text())
    if not needs_sidecar and CONFIG_MARK not in data:
        return  # leave transformers' own file byte for byte
    data.pop(CONFIG_MARK, None)
    if needs_sidecar:
        variants = sorted({s.variant for s in record.steps}) if record is not None else []
        data[CONFIG_MARK] = {
            "needs_sidecar": True,
            "sidecar": SIDECAR,
            "variants": variants,
            "note": f"saved by hf_attn_swap with a swapped attention ({', '.join(variants)}) that this config cannot "
                    "express: load it with hf_attn_swap.load_swapped; plain from_pretrained builds the original "
                    "attention",
        }
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _drop_mark(config: Any) -> None:
    """The mark describes the folder, not the model: a loaded model's config must not carry it into a later save."""
    if hasattr(config, CONFIG_MARK):
        delattr(config, CONFIG_MARK)


def save_swapped(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None, *,
                 overwrite: bool = False) -> Path:
    """Save ``model`` (swapped or not) to ``path`` atomically, with the ``hf_attn_swap.json`` sidecar.

    Args:
        model: a transformers model, usually after :func:`~hf_attn_swap.swap_attention`.
        path: target directory: missing or empty, or a previous checkpoint of ours (then only with ``overwrite``).
        tokenizer: saved alongside when given.
        overwrite: replace a previous checkpoint in ``path`` (atomically). A folder holding anything a checkpoint did
            not write is refused even then: nothing that this package did not write is ever deleted.

    Returns:
        The directory.

    Raises:
        OutputDirError: ``path`` may not be written (see :func:`hf_attn_swap.outputs.check_output_dir`); checked
            before anything is written.
    """
    path = check_output_dir(path, overwrite=overwrite, kind=CHECKPOINT_KIND)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    config, exported_state, vanilla, exported = _vanilla_form(model)
    record = swap_record(model)
    try:
        model.save_pretrained(tmp)
        if exported_state is not None:
            # Another family's weights layout (e.g. GPT-2 Conv1D -> GPT-BigCode Linear).
            for f in list(tmp.glob("model*.safetensors")) + list(tmp.glob("model.safetensors.index.json")):
                f.unlink()
            save_file(exported_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        elif not vanilla:
            # transformers may rename keys on save (e.g. GPT-NeoX lm_head -> embed_out) and only undoes that inside
            # from_pretrained, which cannot build a swapped model. Store the state dict under its own names instead.
            for f in list(tmp.glob("model*.safetensors")) + list(tmp.glob("model.safetensors.index.json")):
                f.unlink()
            save_model(model, str(tmp / "model.safetensors"))
        if config is not model.config:
            config.save_pretrained(tmp)  # the vanilla family's config, same state dict
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_v4_loadable(tmp)  # transformers 4.x and tools pinned to it (llama.cpp's converter) load it too
        _mark_config(tmp / "config.json", record, needs_sidecar=not vanilla)
        files = sorted(p.name for p in tmp.iterdir() if p.name != SIDECAR)
        sidecar = {
            "format_version": FORMAT_VERSION,
            "hf_attn_swap_version": __version__,
            "model_class": type(model).__name__,
            "saved_model_type": config.model_type,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "vanilla": vanilla,
            "attn_implementation": attn_implementation(model),
            "record": record.to_dict() if record is not None else None,
            # steps the saved vanilla family runs natively (not replayed on load)
            "exported_steps": sorted(exported),
            # everything this save wrote: a later save with overwrite=True may replace these and nothing else
            "files": files,
            "sha256": {n: _sha256(tmp / n) for n in files if any(fnmatch.fnmatch(n, p) for p in _HASHED)},
        }
        sidecar[_SELF_HASH] = _content_digest(sidecar)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        backup = None
        if path.exists():
            backup = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, backup)
        os.replace(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s to %s (%s)", type(model).__name__, path, "vanilla-loadable" if vanilla else "needs hf_attn_swap")
    return path


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of a saved directory, checked against its own recorded hash; None if it has none.

    Raises:
        CheckpointIntegrityError: the sidecar is not valid JSON (truncated, damaged) or was edited after saving.
        ValueError: a sidecar format this version cannot read.
    """
    f = Path(path) / SIDECAR
    if not f.exists():
        return None
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointIntegrityError(f"{f} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                                       "it is truncated or damaged; restore it or save the model again") from None
    except UnicodeDecodeError as err:
        raise CheckpointIntegrityError(f"{f} is not UTF-8 text ({err.reason} at byte {err.start}): it is damaged; "
                                       "restore it or save the model again") from None
    if not isinstance(data, dict):
        raise CheckpointIntegrityError(f"{f} holds a JSON {type(data).__name__}, not the sidecar's object: it is "
                                       "damaged; restore it or save the model again")
    if data.get("format_version") not in _READABLE_FORMATS:
        raise ValueError(f"{f}: sidecar format {data.get('format_version')!r} is not supported (this version reads "
                         f"{', '.join(map(str, _READABLE_FORMATS))})")
    if data["format_version"] >= 2:
        expected, found = data.get(_SELF_HASH), _content_digest(data)
        if expected != found:
            raise CheckpointIntegrityError(
                f"{f} was changed after saving: the sha256 of its content is {found[:16]}..., the recorded "
                f"{_SELF_HASH} is {str(expected)[:16]}...; restore it or save the model again"
            )
    return data


def verify_checkpoint(path: str | os.PathLike[str], sidecar: dict[str, Any] | None = None) -> None:
    """Check every file hash the sidecar recorded (config.json, the weights) against the files in ``path``.

    Args:
        path: a directory written by :func:`save_swapped`.
        sidecar: its sidecar, if already read (else it is read and checked here).

    Raises:
        CheckpointIntegrityError: a recorded file is missing or its sha256 differs (the message names the file, the
            expected and the found hash); also for a damaged or edited sidecar, or none at all.
    """
    path = Path(path)
    sidecar = read_sidecar(path) if sidecar is None else sidecar
    if sidecar is None:
        raise CheckpointIntegrityError(f"{path / SIDECAR} is missing: nothing to verify {path} against")
    if sidecar.get("format_version", 1) < 2:
        logger.warning("%s: sidecar format %s records no hashes, so %s cannot be verified; save it again to add them",
                       path / SIDECAR, sidecar.get("format_version"), path)
        return
    for name, expected in sorted((sidecar.get("sha256") or {}).items()):
        file = path / name
        if not file.is_file():
            raise CheckpointIntegrityError(f"{file} is missing (the checkpoint's {SIDECAR} records it); restore it "
                                           "or save the model again")
        found = _sha256(file)
        if found != expected:
            raise CheckpointIntegrityError(
                f"{file} is not the file that was saved: sha256 {found[:16]}... found, {expected[:16]}... recorded in "
                f"{SIDECAR}; it was changed or replaced after saving"
            )


def _config_mark(path: Path) -> dict[str, Any] | None:
    try:
        mark = json.loads((path / "config.json").read_text()).get(CONFIG_MARK)
    except (OSError, ValueError, AttributeError):
        return None  # AutoConfig reports a missing or broken config.json in its own words below
    return mark if isinstance(mark, dict) and mark.get("needs_sidecar") else None


def _model_class(config: Any) -> type:
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"cannot tell which transformers class to build from config.architectures={arch!r}")
    return cls


def load_swapped(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
                 allow_plain: bool = False) -> nn.Module:
    """Load a directory written by :func:`save_swapped` (or a plain transformers directory) with its swap.

    The sidecar and the files it hashes are verified first (:func:`verify_checkpoint`).

    Args:
        path: the directory.
        dtype: load in this dtype (default: the dtype it was saved in).
        allow_plain: load a checkpoint that needs its (missing) sidecar as a plain model anyway, with a WARNING: its
            attention is then the original one, not the saved swap.

    Raises:
        CheckpointIntegrityError: the sidecar is damaged or edited, a hashed file is missing or changed, or the
            sidecar of a checkpoint that needs one is missing.
        SidecarMismatchError: the sidecar's steps do not build the tensors in the weights file.
    """
    path = Path(path)
    sidecar = read_sidecar(path)
    if sidecar is None:
        mark = _config_mark(path)
        if mark is not None and not allow_plain:
            raise CheckpointIntegrityError(
                f"{path / SIDECAR} is missing: {path} was saved with a swapped attention "
                f"({', '.join(mark.get('variants') or ['?'])}) that config.json cannot describe; restore the sidecar, "
                "or pass allow_plain=True to load the original attention instead"
            )
        if mark is not None:
            logger.warning("%s is missing: loading %s as a plain model with its original attention, not the saved "
                           "swap (%s)", path / SIDECAR, path, ", ".join(mark.get("variants") or ["?"]))
    else:
        verify_checkpoint(path, sidecar)
    config = AutoConfig.from_pretrained(path)
    _drop_mark(config)
    cls = _model_class(config)
    if sidecar is None:
        logger.info("%s has no %s: loading as a plain transformers checkpoint", path, SIDECAR)
        model = cls.from_pretrained(path, dtype=dtype or "auto").eval()
        _drop_mark(model.config)
        return model
    dtype = dtype or getattr(torch, sidecar.get("dtype", "float32"))
    steps = [SwapStep(**s) for s in (sidecar.get("record") or {}).get("steps", [])]
    exported = set(sidecar.get("exported_steps", []))
    replay = [s for i, s in enumerate(steps) if i not in exported]
    if sidecar.get("vanilla"):
        # transformers' own loader (it knows its key renames); the replay below must then change no shape.
        model = cls.from_pretrained(path, dtype=dtype)
        _drop_mark(model.config)
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        _restore_original_implementation(model, sidecar)
        _replay(model, replay, path)
        after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if before != after:
            changed = sorted(k for k in after if before.get(k) != after[k])[:3]
            raise SidecarMismatchError(
                f"{path / SIDECAR} does not match {path}: its swap would reshape {changed}; the weights were saved "
                "after a different conversion"
            )
    else:
        with no_init_weights():
            model = cls(config)
        model = model.to(dtype)
        model.tie_weights()
        _restore_original_implementation(model, sidecar)
        _replay(model, replay, path)
        file = path / "model.safetensors"
        with safe_open(str(file), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        state = model.state_dict()
        for name, shape in shapes.items():
            if name not in state:
                raise SidecarMismatchError(f"{path}: weights hold {name!r}, which the swap in {SIDECAR} does not build")
            if tuple(state[name].shape) != shape:
                raise SidecarMismatchError(
                    f"{path}: tensor {name!r} has shape {shape} in the weights but the swap recorded in {SIDECAR} "
                    f"builds {tuple(state[name].shape)}; the sidecar does not describe these weights"
                )
        # Learned feature maps (hedgehog) missing from the file would silently run untrained: say so plainly.
        require_feature_map_state(model, shapes.keys())
        missing, unexpected = load_model(model, str(file), strict=False)
        # Tied parameters are stored once; a missing name that shares storage with a loaded one is loaded.
        loaded_ptrs = {state[k].data_ptr() for k in shapes}
        buffers = _non_persistent(model)
        missing = [k for k in missing if k not in buffers and state[k].data_ptr() not in loaded_ptrs]
        if missing or unexpected:
            raise SidecarMismatchError(f"{path}: weights missing {missing[:5]} / unexpected {list(unexpected)[:5]}")
    if steps:
        # Keep what the original swap knew (lossy, calibration) rather than what the shape-only replay saw.
        record = swap_record(model) or SwapRecord(original_attn_implementation=attn_implementation(model))
        record.steps = steps
        record.original_attn_implementation = (sidecar.get("record") or {}).get(
            "original_attn_implementation", record.original_attn_implementation
        )
        setattr(model, RECORD_ATTR, record)
    return model.eval()


def _restore_original_implementation(model: nn.Module, sidecar: dict[str, Any]) -> None:
    """Give the rebuilt model the attention implementation the saved one was loaded with, before the swap is
    replayed: layers a plan left alone run it (e.g. Gemma-2's eager with softcap), whatever transformers would pick
    by default today (5.20 picks sdpa for Gemma-2, 5.24 eager)."""
    original = (sidecar.get("record") or {}).get("original_attn_implementation")
    if not original or original == attn_implementation(model):
        return
    try:
        set_attn_implementation(model, original)
    except (ImportError, ValueError) as err:  # e.g. flash_attention_2 saved on a GPU, loaded where it cannot run
        logger.warning("the saved model ran %s on the layers its swap left alone, which cannot run here (%s); they "
                       "run %s", original, err, attn_implementation(model))


def _replay(model: nn.Module, steps: list[SwapStep], path: Path) -> None:
    try:
        for step in steps:
            plan = _plan(step.variant, step.layers, dict(step.options), _num_layers(model))
            for cfg, idx in plan:
                cfg.check_model(model, idx)
            _apply_plan(model, plan, structure_only=True)
    except ValueError as err:
        raise SidecarMismatchError(f"{path / SIDECAR} does not match {path}: replaying its swap failed: {err}") from err


def _num_layers(model: nn.Module) -> int:
    from .convert.projections import find_attention

    return len(find_attention(model, get_adapter(model)))


def _non_persistent(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{b}" if mod_name else b)
    return names


#: ``hf_attn_swap.from_pretrained(path)`` reads like transformers.
from_pretrained = load_swapped
