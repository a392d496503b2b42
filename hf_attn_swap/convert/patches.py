"""Forward replacements for architectures whose attention cannot express fewer KV heads.

Only GPT-NeoX needs one: its fused ``query_key_value`` is viewed as ``(..., heads, 3 * head_size)``, interleaved per
head, so a smaller K/V cannot be expressed in that layout. A converted module gets a subclass (so ``isinstance`` and
the adapter's class match still hold) whose forward reads the fused projection as ``[Q | K | V]`` blocks.

The forward follows transformers' ``GPTNeoXAttention.forward`` (same signature, same helpers from its modeling file);
``tests/test_internals.py`` checks that signature and those helpers, so a transformers release that changes them fails
there, by name, rather than here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..hf_compat import attention_function, modeling_module_of


def _gpt_neox_block_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_past=None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
):
    neox = modeling_module_of(self, depth=1)  # the class this patch subclasses
    input_shape = hidden_states.shape[:-1]
    qkv = self.query_key_value(hidden_states)
    q_size = self.config.num_attention_heads * self.head_size
    kv_size = (qkv.shape[-1] - q_size) // 2
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    shape = (*input_shape, -1, self.head_size)
    q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = neox.apply_rotary_pos_emb(q, k, cos, sin)  # partial rotary: only the first rotary dims turn
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    attention_interface: Callable = attention_function(self.config, neox.eager_attention_forward)
    out, weights = attention_interface(
        self,
        q,
        k,
        v,
        attention_mask,
        scaling=self.scaling,
        dropout=0.0 if not self.training else self.attention_dropout,
        **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return self.dense(out), weights


_FORWARDS = {"gpt_neox": _gpt_neox_block_forward}
_SUBCLASSES: dict[tuple[type, str], type] = {}


def patched_class(module: nn.Module, patch: str) -> type:
    """The subclass of ``type(module)`` whose forward is the ``patch`` replacement (cached per class)."""
    base = type(module)
    if getattr(base, "_hf_attn_swap_patch", None) == patch:
        return base
    key = (base, patch)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(
            f"GQA{base.__name__}", (base,), {"forward": _FORWARDS[patch], "_hf_attn_swap_patch": patch}
        )
    return _SUBCLASSES[key]
