"""The decode kernel of :mod:`.band_cpu` as a torch operator, ``torch.ops.hf_attn_swap.decode_attention``.

torch.compile cannot trace a ctypes call: called directly, the kernel would break the graph at every layer of a
compiled decode step. As a custom operator it is one node of the graph, which inductor calls as it is; its fake
implementation tells the compiler the output's shape, dtype and layout without running it.

Eager callers keep calling :func:`.band_cpu.decode_attention_unchecked` directly: the operator's dispatch and input
checks add about 13 us a call, more than the kernel's own work at short contexts (see ``grouped_attention`` in
:mod:`.gqa`).
"""

from typing import Optional

import torch

from . import band_cpu

OP_NAME = "hf_attn_swap::decode_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`.band_cpu.decode_attention` (``isa="auto"``): query ``(b, H, 1, d)``, key/value ``(b, H_kv, n, d)``,
    ``key_valid`` bool ``(b or 1, n)`` or None; returns ``(b, 1, H, d)``.

    Anyone can reach an operator, so the inputs are checked (the C side trusts pointers and strides); a last dimension
    that a compiled graph handed over strided is made contiguous first rather than refused.
    """
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    return band_cpu.decode_attention(query, key, value, scale=scale, key_valid=key_valid)


@decode_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
      key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    b, h, _, d = query.shape
    return query.new_empty(b, 1, h, d)  # what decode_attention_unchecked allocates: contiguous (b, 1, H, d)
