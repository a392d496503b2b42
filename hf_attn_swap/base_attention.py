"""The attention that layers a per-layer plan does not touch keep: the implementation the model was loaded with.

A per-layer plan selects one registered dispatcher for the whole model (transformers picks one implementation per
model). The dispatcher runs each swapped module's variant; every other module must run what it ran before the swap
(eager with Gemma-2's softcap, eager's ``output_attentions`` weights, SDPA, flex, flash), not SDPA by default.

The dispatcher's model-level mask is SDPA-format (see :mod:`.registry`): a 4D bool mask, or None when plain causality
is exact. Each implementation gets it in the format its own mask function would have built:

* ``sdpa``: as is.
* ``eager`` and any other registered function: an additive float mask (0 / dtype min), with causality spelled out
  where SDPA would have used ``is_causal`` (eager adds the mask and nothing else).
* ``flex_attention``: a ``BlockMask`` built from the same boolean mask. (transformers' flex path also takes a tensor
  as an additive score mask, but with torch 2.13 on CPU that path aborted the process in a probe; the BlockMask path
  matched SDPA to 4e-7.)
* ``flash_attention_*`` (CUDA only, not exercised by this package's CPU tests): None or a 2D key-padding mask,
  causality and the window being the kernel's own flags.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .hf_compat import model_eager_attention
from .reference import causal_bool_mask

#: attribute on an untouched attention module: the implementation the model ran before any swap.
BASE_IMPL_ATTR = "_hf_attn_swap_base_impl"


def model_eager_function(module: nn.Module) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of ``module``'s own modeling file (see :func:`hf_compat.model_eager_attention`)."""
    fn = model_eager_attention(module)
    if fn is None:
        raise RuntimeError(
            f"{type(module).__name__} was loaded with eager attention but its modeling file has no "
            "eager_attention_forward; load the model with attn_implementation='sdpa' before a per-layer swap"
        )
    return fn


def additive_mask(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor):
    """SDPA-format mask -> the additive float mask eager attention adds to its scores (None: attend to all)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    mask = _bool_mask(mask, module, query, key)
    if mask is None:
        return None
    zeros = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
    return zeros.masked_fill(~mask.to(query.device), torch.finfo(query.dtype).min)


def _bool_mask(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor):
    """SDPA-format mask with causality spelled out (None only where every key is visible to every query)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if not getattr(module, "is_causal", True) or q_len == 1:
            return None
        # SDPA's is_causal shortcut: sdpa_mask returns None only when q == kv or q == 1, where it is exact.
        return causal_bool_mask(q_len, kv_len, query.device)[None, None]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def block_mask(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor):
    """SDPA-format mask -> the ``BlockMask`` flex attention takes (None: attend to all)."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = _bool_mask(mask, module, query, key)
    if dense is None:
        return None
    b, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    dense = dense[:, :1, :, -kv_len:].expand(b, 1, q_len, kv_len).to(query.device)

    def mask_mod(bi, hi, qi, ki):
        return dense[bi, 0, qi, ki]

    return create_block_mask(mask_mod, b, None, q_len, kv_len, device=query.device)


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:  # pragma: no cover - CUDA only
    """SDPA-format mask -> the 2D ``(b, kv)`` key-padding mask flash attention takes (None without padding).

    A key is real when some query of this call may see it; padding columns are False in every row. At decode a key
    older than a sliding window is marked too, which changes nothing: the kernel's window hides it anyway.
    """
    if mask is None or mask.dtype != torch.bool:
        return None
    valid = mask[:, 0].any(dim=-2)
    return None if bool(valid.all()) else valid.to(torch.int32)


def base_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any):
    """Run the implementation recorded on an untouched ``module`` with the mask converted for it."""
    impl = module.__dict__.get(BASE_IMPL_ATTR) or "sdpa"
    eager = model_eager_function(module) if impl == "eager" else None
    fn = eager or ALL_ATTENTION_FUNCTIONS.get_interface(impl, None)
    if fn is None:  # pragma: no cover - only a name removed from the interface after the swap
        raise RuntimeError(f"attention implementation {impl!r} of layer {getattr(module, 'layer_idx', '?')} is no "
                           "longer registered in transformers' AttentionInterface")
    if impl == "sdpa":
        mask = attention_mask
    elif impl == "flex_attention":
        mask = block_mask(attention_mask, module, query, key)
    elif impl.startswith("flash_attention"):  # pragma: no cover - CUDA only
        mask = key_padding_mask(attention_mask)
    else:
        mask = additive_mask(attention_mask, module, query, key)
    return fn(module, query, key, value, mask, **kwargs)
