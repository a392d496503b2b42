"""Plain fp32 reference implementations: the oracle every fast path is tested against.

Nothing here is fast or clever. Keys/values are repeated to the query heads, scores are materialised, masks are
applied densely. If a fast path and this module disagree, the fast path is wrong.
"""

from __future__ import annotations

import torch


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat ``(b, H_kv, n, d)`` to ``(b, H, n, d)``: query head h reads KV head ``h // (H // H_kv)``."""
    h_kv = x.shape[1]
    if num_heads % h_kv:
        raise ValueError(f"{num_heads} query heads cannot share {h_kv} KV heads evenly")
    return x.repeat_interleave(num_heads // h_kv, dim=1)


def causal_bool_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(q, kv)`` causal mask, bottom-right aligned: the queries are the last ``q_len`` positions of ``kv_len``."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return k_pos <= q_pos


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    is_causal: bool = True,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention in fp32.

    Args:
        query: ``(b, H, q, d)``.
        key, value: ``(b, H_kv, kv, d)`` (H_kv divides H).
        attention_mask: SDPA-format mask, bool ``(b|1, 1|H, q, kv)`` (True = attend) or additive float; ``None``
            means causal (if ``is_causal`` and q > 1) or no mask.
        scaling: score scale; ``d ** -0.5`` if None.
        is_causal: used only when ``attention_mask`` is None.
        softcap: Gemma-2 style ``tanh`` logit cap.

    Returns:
        ``(b, q, H, d)`` in the query's dtype: the layout transformers expects back from an attention function.
    """
    dtype = query.dtype
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    q = query.float()
    k = expand_kv(key.float(), h)
    v = expand_kv(value.float(), h)
    scale = d**-0.5 if scaling is None else scaling
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        if is_causal and q_len > 1:
            scores = scores.masked_fill(~causal_bool_mask(q_len, kv_len, query.device), float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., -kv_len:], float("-inf"))
    else:
        scores = scores + attention_mask[..., -kv_len:].float()
    probs = torch.softmax(scores, dim=-1)
    # Rows with nothing visible (fully padded queries) give NaN in softmax; SDPA returns zeros-or-garbage there and
    # transformers never reads them. Use zeros so comparisons can ignore them deterministically.
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.transpose(1, 2).to(dtype)


def reference_pool_heads(weight: torch.Tensor, num_kv_heads: int, new_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Mean of the K/V projection rows of each group of heads, written as explicit loops (oracle for pooling).

    Args:
        weight: ``(num_kv_heads * head_dim, in)`` (or a bias, ``(num_kv_heads * head_dim,)``).
    """
    group = num_kv_heads // new_kv_heads
    rows = []
    for g in range(new_kv_heads):
        acc = torch.zeros_like(weight[:head_dim], dtype=torch.float64)
        for j in range(g * group, (g + 1) * group):
            acc += weight[j * head_dim : (j + 1) * head_dim].double()
        rows.append(acc / group)
    return torch.cat(rows).to(weight.dtype)
