"""Save and load swapped models.

``save_swapped`` writes a normal ``save_pretrained`` directory plus a small sidecar, ``hf_attn_swap.json``, that
records every swap step. Where the result has a vanilla transformers form (a llama-family GQA conversion: the config's
``num_key_value_heads`` says it all; or a variant's ``vanilla_export``), the directory also loads with plain
``from_pretrained`` in a process that never imports this package. Where it has none (GPT-2 / GPT-NeoX / BERT with fewer
KV heads, attention-only variants), :func:`load_swapped` restores it exactly: it builds the model from its config,
replays the recorded steps shape-only, checks every tensor shape against the weights file, and loads the weights.

Saves are atomic: the directory is written beside the target and renamed into place, so an interrupted save leaves
either the previous directory or none, never a directory that loads as a different model.
"""

from __future__ import annotations

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
from .hf_compat import attn_implementation, make_v4_loadable, no_init_weights
from .registry import get_variant
from .variants.linear import require_feature_map_state

logger = logging.getLogger(__name__)

SIDECAR = "hf_attn_swap.json"
FORMAT_VERSION = 1


class SidecarMismatchError(ValueError):
    """The sidecar's recorded swap does not build the tensors stored in the weights file."""


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


def save_swapped(model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Save ``model`` (swapped or not) to ``path`` atomically, with the ``hf_attn_swap.json`` sidecar.

    Args:
        model: a transformers model, usually after :func:`~hf_attn_swap.swap_attention`.
        path: target directory (replaced atomically if it exists).
        tokenizer: saved alongside when given.

    Returns:
        The directory.
    """
    path = Path(path)
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
        }
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
    """The sidecar of a saved directory, or None if it has none."""
    f = Path(path) / SIDECAR
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{f}: sidecar format {data.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    return data


def _model_class(config: Any) -> type:
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"cannot tell which transformers class to build from config.architectures={arch!r}")
    return cls


def load_swapped(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a directory written by :func:`save_swapped` (or a plain transformers directory) with its swap.

    Args:
        path: the directory.
        dtype: load in this dtype (default: the dtype it was saved in).

    Raises:
        SidecarMismatchError: the sidecar's steps do not build the tensors in the weights file.
    """
    path = Path(path)
    sidecar = read_sidecar(path)
    config = AutoConfig.from_pretrained(path)
    cls = _model_class(config)
    if sidecar is None:
        logger.info("%s has no %s: loading as a plain transformers checkpoint", path, SIDECAR)
        return cls.from_pretrained(path, dtype=dtype or "auto").eval()
    dtype = dtype or getattr(torch, sidecar.get("dtype", "float32"))
    steps = [SwapStep(**s) for s in (sidecar.get("record") or {}).get("steps", [])]
    exported = set(sidecar.get("exported_steps", []))
    replay = [s for i, s in enumerate(steps) if i not in exported]
    if sidecar.get("vanilla"):
        # transformers' own loader (it knows its key renames); the replay below must then change no shape.
        model = cls.from_pretrained(path, dtype=dtype)
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
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
