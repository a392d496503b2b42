"""Tiny random models of every supported architecture (fast, CPU, fp32), shared by the tests."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8)
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: model_type -> (config factory, model class). 8 query heads; 4 KV heads where the family has GQA, else MHA.
TINY = {
    "llama": (lambda: tf.LlamaConfig(**COMMON, num_key_value_heads=4, head_dim=8, **SPECIAL), tf.LlamaForCausalLM),
    "mistral": (lambda: tf.MistralConfig(**COMMON, num_key_value_heads=4, head_dim=8, **SPECIAL), tf.MistralForCausalLM),
    "qwen2": (lambda: tf.Qwen2Config(**COMMON, num_key_value_heads=4, **SPECIAL), tf.Qwen2ForCausalLM),
    "qwen3": (lambda: tf.Qwen3Config(**COMMON, num_key_value_heads=4, head_dim=8, **SPECIAL), tf.Qwen3ForCausalLM),
    "gemma": (lambda: tf.GemmaConfig(**COMMON, num_key_value_heads=4, head_dim=8, **SPECIAL), tf.GemmaForCausalLM),
    # eager: what transformers >= 5.24 picks for Gemma2 (its logit softcap); 5.20 picked SDPA, which drops the softcap
    "gemma2": (
        lambda: tf.Gemma2Config(**COMMON, num_key_value_heads=4, head_dim=8, attn_implementation="eager", **SPECIAL),
        tf.Gemma2ForCausalLM,
    ),
    "gemma3_text": (
        lambda: tf.Gemma3TextConfig(**COMMON, num_key_value_heads=4, head_dim=8, **SPECIAL),
        tf.Gemma3ForCausalLM,
    ),
    "phi3": (lambda: tf.Phi3Config(**COMMON, num_key_value_heads=8, **SPECIAL), tf.Phi3ForCausalLM),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=8, **SPECIAL), tf.GPT2LMHeadModel),
    "gpt_neox": (
        lambda: tf.GPTNeoXConfig(**COMMON, rotary_pct=0.5, **SPECIAL),
        tf.GPTNeoXForCausalLM,
    ),
    "bert": (lambda: tf.BertConfig(**COMMON, pad_token_id=0), tf.BertModel),
}


def tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``model_type`` in eval mode (deterministic for a seed)."""
    make_config, cls = TINY[model_type]
    torch.manual_seed(seed)
    return cls(make_config()).eval()


def output(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "generate") and not isinstance(model, tf.BertModel)


def save_tiny_llama(out, *, layers: int = 2, max_positions: int = 128, seed: int = 0):
    """Save a tiny random llama (hidden 32, 4 heads, 2 KV heads, tied embeddings) with SmolLM2's real tokenizer into
    ``out``, for the uptraining tests that need a real tokenizer and real text but not real weights."""
    from hf_attn_swap.zoo import resolve_model

    tok = tf.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
