"""Uptraining objectives: language-model loss, logit distillation (KL to a teacher), attention transfer (MSE).

All three work on any causal LM this package can swap; the teacher is the unconverted model, frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention_sites


def check_teacher(student: nn.Module, teacher: nn.Module, student_tokenizer: Any = None,
                  teacher_tokenizer: Any = None) -> None:
    """Raise unless the teacher can supervise the student token by token (same vocabulary and tokenizer).

    Raises:
        ValueError: different ``vocab_size``, different output sizes, or tokenizers with different vocabularies.
    """
    sv, tv = getattr(student.config, "vocab_size", None), getattr(teacher.config, "vocab_size", None)
    if sv != tv:
        raise ValueError(
            f"teacher and student have different vocabularies (vocab_size {tv} vs {sv}): distillation compares "
            "logits token by token; use the unconverted model the student was converted from as teacher"
        )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ValueError(
                "teacher and student tokenizers differ (their vocabularies map tokens to different ids); use the "
                "tokenizer of the model the student was converted from for both"
            )


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy (mean over predicted tokens; padding excluded)."""
    labels = input_ids[:, 1:]
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
    lg = logits[:, :-1]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(teacher || student)`` of the temperature-softened next-token distributions, per token, times ``T^2``.

    The ``T^2`` factor keeps gradient sizes comparable across temperatures (Hinton et al. 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape ({tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}): they need the same vocabulary"
        )
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (p.exp() * (p - s)).sum(-1)
    if attention_mask is not None:
        m = attention_mask.to(per_token.dtype)
        return (per_token * m).sum() / m.sum().clamp_min(1) * t * t
    return per_token.mean() * t * t


@contextlib.contextmanager
def capture_attention_outputs(model: nn.Module, detach: bool = False) -> Iterator[list[torch.Tensor | None]]:
    """Inside the block, the model's attention modules write their outputs into the yielded list (layer order).

    Raises:
        ValueError: (on use) an attention module returned no output tensor.
    """
    sites = attention_sites(model)
    outs: list[torch.Tensor | None] = [None] * len(sites)

    def make(i: int):
        def hook(_m, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            if not isinstance(y, torch.Tensor):
                raise ValueError(f"attention layer {i} ({type(_m).__name__}) returned no output tensor to transfer")
            outs[i] = y.detach() if detach else y

        return hook

    handles = [s.module.register_forward_hook(make(i)) for i, s in enumerate(sites)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def attention_mse(student_outs: list[torch.Tensor | None], teacher_outs: list[torch.Tensor | None],
                  layers: list[int] | None = None) -> torch.Tensor:
    """Mean over layers of the MSE between student and teacher attention outputs, each divided by the
    teacher output's mean square (so every layer counts alike whatever its scale)."""
    if len(student_outs) != len(teacher_outs):
        raise ValueError(f"{len(student_outs)} student vs {len(teacher_outs)} teacher attention layers")
    idx = range(len(student_outs)) if layers is None else layers
    terms = []
    for i in idx:
        s, t = student_outs[i], teacher_outs[i]
        if s is None or t is None:
            raise ValueError(f"attention layer {i} produced no output to transfer in the last forward pass")
        s, t = s.float(), t.detach().float()  # summed in float32 also when the products ran in bfloat16
        terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    if not terms:
        raise ValueError("no attention layer selected for attention transfer")
    return torch.stack(terms).mean()
