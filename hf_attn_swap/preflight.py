"""Checks that run before a model is loaded: the folder, the dtype on the device, and whether the weights fit.

Each failure is one ``ValueError`` line that says what is allowed, raised before any weight is read, so a refused
load costs a second instead of minutes of loading (or the machine's memory).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import psutil
import torch

logger = logging.getLogger(__name__)

#: names accepted for ``--dtype`` / ``load_model(dtype=...)``.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a ``torch.dtype`` passes through if it is one of :data:`DTYPES`)."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise ValueError(f"dtype {name} is not supported for loading; allowed: {', '.join(DTYPES)}")
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_device(name: str | torch.device | None) -> torch.device:
    """A device the machine has (see :func:`hf_attn_swap.devices.resolve_device`; ``auto`` picks the GPU when there
    is one); None is the CPU."""
    from .devices import resolve_device

    return torch.device("cpu") if name is None else resolve_device(name)


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot compute in (bfloat16 on CUDA GPUs older than Ampere).

    The CPU runs all of :data:`DTYPES` (torch has float16/bfloat16 CPU kernels, only slower than float32's).
    """
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"{name} cannot run bfloat16; allowed on this device: float32, float16")


def check_model_folder(path: str | os.PathLike[str]) -> Path:
    """Refuse a folder that does not exist or does not hold a Hugging Face model of a supported architecture."""
    from transformers import AutoConfig

    from .convert.adapters import get_adapter

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist; pass a short name (see zoo) or a folder "
                         "holding config.json and *.safetensors")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json); it must hold "
                         "config.json and the weights (*.safetensors)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ValueError(f"{str(folder)!r} has a config.json but no weights (*.safetensors or *.bin)")
    config = AutoConfig.from_pretrained(folder)
    get_adapter(config)  # unsupported architecture: one line naming the supported ones
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != "bert" and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(f"{str(folder)!r} holds {architectures or config.model_type}, not a causal LM "
                         "(*ForCausalLM / *LMHeadModel); only causal LMs and BERT encoders are converted")
    return folder


def weight_bytes(path: str | os.PathLike[str], dtype: torch.dtype) -> int:
    """Bytes the model's parameters take in ``dtype``: parameters counted on the ``meta`` device from config.json.

    Nothing is allocated: the model is built on ``meta``, which also counts tied weights once.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    auto_cls = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_cls.from_config(config)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    return n * torch.finfo(dtype).bits // 8


def available_bytes(device: torch.device) -> int:
    """Free memory where the weights go: ``psutil`` available RAM for the CPU, free CUDA memory for a GPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def check_fits(path: str | os.PathLike[str], dtype: torch.dtype, device: torch.device) -> int:
    """Refuse a load whose weights alone exceed the device's available memory; returns the weights' bytes."""
    need = weight_bytes(path, dtype)
    have = available_bytes(device)
    if need > have:
        raise ValueError(
            f"not enough memory: the weights need {need / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')} but "
            f"{device.type} has {have / 2**30:.2f} GiB available; use a smaller dtype (bfloat16/float16) or a "
            "device with more memory"
        )
    logger.info("weights: %.2f GiB in %s, %.2f GiB available on %s", need / 2**30, dtype, have / 2**30, device)
    return need


def preflight(path: str | os.PathLike[str], dtype: str | torch.dtype, device: str | torch.device | None) -> int:
    """All checks before loading a local folder, in order: folder, dtype, device, dtype on device, memory.

    Returns:
        The weights' bytes in ``dtype``.
    """
    folder = check_model_folder(path)
    dt = parse_dtype(dtype)
    dev = parse_device(device)
    check_dtype_on_device(dt, dev)
    return check_fits(folder, dt, dev)
