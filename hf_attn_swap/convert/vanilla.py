"""Vanilla transformers forms of converted models that their own family cannot express.

GPT-2 has no ``num_key_value_heads``, but GPT-BigCode with ``multi_query=True`` is GPT-2 with one shared K/V head:
same module names, ``nn.Linear`` where GPT-2 has transposed ``Conv1D``, ``c_attn`` rows ``[Q | K | V]``. A GPT-2
converted to MQA therefore saves as a GPT-BigCode checkpoint that any transformers loads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: GPT-2 config fields -> GPT-BigCode config fields (same meaning).
_GPT2_TO_BIGCODE = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function", "resid_pdrop",
    "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range", "scale_attn_weights", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings",
)


def gpt2_mqa_as_bigcode(model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """``(GPTBigCodeConfig, state_dict)`` for a GPT-2 whose every layer has one KV head; None if not expressible."""
    from transformers import GPTBigCodeConfig
    from transformers.pytorch_utils import Conv1D

    cfg = model.config
    if cfg.model_type != "gpt2" or type(model).__name__ not in ("GPT2LMHeadModel", "GPT2Model"):
        return None
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        return None  # GPT-BigCode has neither option: no exact vanilla form
    for block in model.transformer.h if hasattr(model, "transformer") else model.h:
        if block.attn.c_attn.weight.shape[1] != cfg.n_embd + 2 * (cfg.n_embd // cfg.n_head):
            return None  # not MQA in every layer
    big = GPTBigCodeConfig(multi_query=True, **{k: getattr(cfg, k) for k in _GPT2_TO_BIGCODE if hasattr(cfg, k)})
    big.architectures = ["GPTBigCodeForCausalLM" if hasattr(model, "lm_head") else "GPTBigCodeModel"]
    conv_names = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, Conv1D)}
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value.t().contiguous() if key in conv_names else value
    if big.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    return big, state
