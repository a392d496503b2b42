"""End-to-end uptraining on the Hugging Face ``Trainer``: weighted LM + distillation + attention-transfer loss.

Because it is a plain ``Trainer``, ``accelerate launch`` (DDP, FSDP) runs the same code on several GPUs; the teacher
is a frozen, unwrapped copy moved to each process's device.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from ..api import attention_sites
from ..convert.adapters import get_adapter
from .config import TRAINABLE
from .objectives import attention_mse, capture_attention_outputs, check_teacher, distill_kl, lm_loss
from .precision import autocast, check_mixed_precision

logger = logging.getLogger(__name__)


class BlockDataset(Dataset):
    """Rows of a ``(n, L)`` LongTensor as ``{"input_ids": row}`` examples."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
            raise ValueError(
                "training text is empty or too short: need at least one block of >= 2 tokens "
                f"(got {tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__})"
            )
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([r["input_ids"] for r in rows])}


def select_trainable(model: nn.Module, which: str, *, lora_r: int = 8, lora_alpha: float = 16.0) -> nn.Module:
    """Freeze everything except what ``which`` names; returns the model to train (a peft model for ``lora``).

    Args:
        which: ``all`` (every floating-point parameter), ``attention`` (every parameter of the attention modules,
            including learned feature maps), ``kv`` (the K and V projections), ``feature_map`` (learned feature maps
            of linear variants, e.g. hedgehog), or ``lora`` (LoRA adapters on the
            Q/K/V/O projections through peft; the base model stays frozen).

    Raises:
        ValueError: unknown choice, or it selects no parameter ("nothing left to train").
    """
    if which not in TRAINABLE:
        raise ValueError(f"unknown trainable {which!r}; allowed: {', '.join(TRAINABLE)}")
    adapter = get_adapter(model)
    if which == "lora":
        from peft import LoraConfig, get_peft_model

        names = sorted({adapter.q, adapter.k, adapter.v, adapter.o.split(".")[-1].lstrip("^")} - {""})
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        targets = [n for n in names if n in present]
        if not targets:
            raise ValueError(f"nothing to train: no Linear projection named {names} for LoRA in {type(model).__name__}")
        cfg = LoraConfig(r=int(lora_r), lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0, bias="none")
        model = get_peft_model(model, cfg)
    else:
        chosen: set[int] = set()
        if which == "all":
            chosen = {id(p) for p in model.parameters() if p.dtype.is_floating_point}
        else:
            from .layerwise import module_parameters

            for site in attention_sites(model):
                chosen.update(id(p) for p in module_parameters(site.module, which, adapter.k, adapter.v))
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"nothing to train: trainable={which!r} selects no parameter of {type(model).__name__}")
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable=%s: %d of %d parameters (%.2f%%)", which, n, total, 100.0 * n / total)
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


class StopAfterSeconds(TrainerCallback):
    """Ends training once ``seconds`` of wall time have passed since ``on_train_begin`` (a checkpoint is kept)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - self.start > self.seconds:
            logger.info("time budget of %.0f s reached at step %d: stopping", self.seconds, state.global_step)
            control.should_training_stop = True
            control.should_save = True
        return control


class LossLog(TrainerCallback):
    """Writes every logged loss to the ``logging`` log (one line per log step), whatever the progress bar does."""

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and any(k.startswith(("loss", "lm", "kl", "attn")) for k in logs):
            parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(logs.items()))
            logger.info("step %d: %s", state.global_step, parts)


class UptrainTrainer(Trainer):
    """``Trainer`` whose loss is ``lm_weight * LM + kl_weight * KL(teacher||student) + attn_weight * attention MSE``.

    Args:
        teacher: the unconverted model (frozen, eval mode); needed when ``kl_weight`` or ``attn_weight`` > 0.
        lm_weight, kl_weight, attn_weight: objective weights (at least one > 0).
        temperature: distillation temperature.
        mixed_precision: ``bf16`` runs the student's and the teacher's forward passes under bfloat16 autocast
            (:mod:`hf_attn_swap.train.precision`). Done here rather than with ``TrainingArguments(bf16=True)``, which
            would cast only the student: the teacher is not prepared by accelerate.
        **kwargs: passed to ``Trainer``.

    Raises:
        ValueError: all weights 0, a teacher needed but missing or with another vocabulary, or no swapped attention
            to transfer when ``attn_weight`` > 0.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, lm_weight: float = 1.0, kl_weight: float = 0.0,
                 attn_weight: float = 0.0, temperature: float = 1.0, mixed_precision: str = "no",
                 **kwargs: Any) -> None:
        check_mixed_precision(mixed_precision)
        if lm_weight + kl_weight + attn_weight <= 0:
            raise ValueError("all objective weights are 0: set lm_weight, kl_weight or attn_weight")
        model = kwargs.get("model", args[0] if args else None)
        if (kl_weight > 0 or attn_weight > 0) and teacher is None:
            raise ValueError("kl_weight/attn_weight need a teacher: pass the unconverted model as teacher=")
        if teacher is not None:
            check_teacher(_base(model), teacher)
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        if attn_weight > 0:
            from .layerwise import check_transferable

            check_transferable(_base(model), teacher)
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.weights = {"lm": float(lm_weight), "kl": float(kl_weight), "attn": float(attn_weight)}
        self.temperature = float(temperature)
        self.mixed_precision = mixed_precision
        self._parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with autocast(self.mixed_precision, inputs["input_ids"].device):
            return self._loss(model, inputs, return_outputs)

    def _loss(self, model, inputs, return_outputs):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        need_teacher = self.weights["kl"] > 0 or self.weights["attn"] > 0
        teacher_logits = t_att = None
        if need_teacher:
            if next(self.teacher.parameters()).device != ids.device:
                self.teacher.to(ids.device)
            with torch.no_grad(), capture_attention_outputs(self.teacher, detach=True) as t_att:
                teacher_logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if self.weights["attn"] > 0:
            with capture_attention_outputs(_base(model)) as s_att:
                outputs = model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            outputs = model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = outputs.logits
        total = logits.new_zeros(())
        parts = {}
        if self.weights["lm"] > 0:
            parts["lm"] = lm_loss(logits, ids, mask)
        if self.weights["kl"] > 0:
            parts["kl"] = distill_kl(logits, teacher_logits, self.temperature, mask)
        if self.weights["attn"] > 0:
            parts["attn"] = attention_mse(s_att, t_att)
        for k, v in parts.items():
            total = total + self.weights[k] * v
            self._parts.setdefault(k, []).append(float(v.detach()))
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for k, vals in self._parts.items():
                if vals:
                    logs[f"{k}_loss"] = round(sum(vals) / len(vals), 6)
            self._parts = {}
        super().log(logs, *args, **kwargs)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/peft wrappers."""
    m = getattr(model, "module", model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m
