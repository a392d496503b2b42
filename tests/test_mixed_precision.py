"""Mixed-precision training (``mixed_precision: bf16``): bfloat16 products under autocast, float32 weights.

Held to the float32 path on the real SmolLM2 and real text: the loss, the gradients and what the per-layer stage
learns must agree with float32 within bfloat16's rounding, and the weights must stay float32.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import TrainingArguments

from hf_attn_swap import swap_attention
from hf_attn_swap.cliconfig import ConfigError
from hf_attn_swap.data import load_text, token_blocks
from hf_attn_swap.train import UptrainConfig, layerwise_transfer
from hf_attn_swap.train import precision
from hf_attn_swap.train.pretrain import PretrainConfig
from hf_attn_swap.train.trainer import BlockDataset, UptrainTrainer, collate


@pytest.mark.parametrize("cls", [UptrainConfig, PretrainConfig])
def test_config_names_what_is_allowed(cls):
    with pytest.raises(ConfigError, match="loss scaling.*allowed: no, bf16"):
        cls(mixed_precision="fp16")
    with pytest.raises(ConfigError, match="unknown mixed_precision 'bfloat17'; allowed: no, bf16"):
        cls(mixed_precision="bfloat17")
    assert cls(mixed_precision="bf16").mixed_precision == "bf16"


def test_autocast_is_a_no_op_for_no_and_warns_on_a_cpu_without_bf16(monkeypatch, caplog):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast("no", "cpu"):
        assert (a @ b).dtype == torch.float32
    with precision.autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=precision.__name__), precision.autocast("bf16", "cpu"):
        pass
    assert "emulated" in caplog.text and "mixed_precision: no" in caplog.text


@pytest.fixture(scope="module")
def text_blocks(smollm2):
    _, tok = smollm2
    return token_blocks(tok, load_text("shakespeare", "train"), 128, max_tokens=1024)


def test_distillation_loss_and_gradients_match_float32(smollm2, text_blocks, tmp_path):
    teacher, _ = smollm2
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
    student.train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    batch = collate([{"input_ids": r} for r in text_blocks[:2]])
    losses, grads = {}, {}
    for mp in ("no", "bf16"):
        tr = UptrainTrainer(model=student, args=args, train_dataset=BlockDataset(text_blocks), data_collator=collate,
                            teacher=teacher, lm_weight=0.5, kl_weight=1.0, mixed_precision=mp)
        student.zero_grad(set_to_none=True)
        loss = tr.compute_loss(student, batch)
        loss.backward()
        losses[mp] = float(loss.detach())
        grads[mp] = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        assert all(p.dtype == torch.float32 for p in student.parameters())
        assert all(g.dtype == torch.float32 for g in grads[mp].values())
    assert losses["no"] > 0.5  # a converted model is far from its teacher: the comparison is not of two zeros
    assert abs(losses["bf16"] - losses["no"]) < 0.01 * losses["no"], losses  # measured: 0.13%

    def cos(names):
        a = torch.cat([grads["no"][n].flatten() for n in names])
        b = torch.cat([grads["bf16"][n].flatten() for n in names])
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    # Rounding noise grows as it is backpropagated through 30 layers of a badly converted (mean-pooled) model:
    # measured cosine 0.999 on the last layer's gradients, 0.5-0.8 on the first layer's; the per-step noise is
    # smaller than the minibatch noise that training averages out anyway (results/uptrain_domains.md compares runs).
    top = [n for n in grads["no"] if any(f"layers.{i}." in n for i in range(25, 30))] + ["model.norm.weight"]
    assert cos(top) > 0.97, cos(top)  # measured: 0.989 over layers 25-29
    assert cos(list(grads["no"])) > 0.6, cos(list(grads["no"]))


def test_layerwise_stage_learns_the_same_in_bf16(smollm2, text_blocks):
    teacher, _ = smollm2
    after = {}
    for mp in ("no", "bf16"):
        student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean")
        res = layerwise_transfer(student, teacher, text_blocks, layers=[3, 17], steps=15, lr=2e-3, batch_rows=2,
                                 mixed_precision=mp)
        assert all(p.dtype == torch.float32 for p in student.parameters())
        for s in res.layers:
            assert s.mse_after < 0.7 * s.mse_before, s
        after[mp] = [s.rel_after for s in res.layers]
    # The errors before and after are measured in float32; bf16 training lands within a few percent of float32's.
    for a, b in zip(after["no"], after["bf16"]):
        assert abs(a - b) < 0.1 * a, after
