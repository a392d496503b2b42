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


# ---------------------------------------------------------------------------------------------------------------------
# References of the attention variants (sliding window with sinks, linear attention with each feature map, BigBird-style
# sparse). Positions are explicit so decode steps over a bounded cache can be checked as well as prefill. Defaults:
# keys at positions 0..kv-1, queries at the last q positions (bottom-right aligned).
# ---------------------------------------------------------------------------------------------------------------------


def _default_positions(
    q_len: int, kv_len: int, q_positions: torch.Tensor | None, k_positions: torch.Tensor | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    if k_positions is None:
        k_positions = torch.arange(kv_len, device=device)
    if q_positions is None:
        q_positions = torch.arange(kv_len - q_len, kv_len, device=device)
    return q_positions.to(device).long(), k_positions.to(device).long()


def sliding_window_bool_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, window: int, sinks: int = 0
) -> torch.Tensor:
    """``(q, kv)`` mask of a causal sliding window with attention sinks, from absolute positions.

    Key ``j`` is visible from query ``i`` when ``i - window < j <= i`` (Mistral's convention: ``window`` counts the
    current token) or when ``j < sinks`` and ``j <= i`` (StreamingLLM's sink tokens).
    """
    out = torch.zeros(len(q_positions), len(k_positions), dtype=torch.bool, device=q_positions.device)
    for r, i in enumerate(q_positions.tolist()):
        for c, j in enumerate(k_positions.tolist()):
            out[r, c] = j <= i and (i - window < j or j < sinks)
    return out


def reference_sliding_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    sinks: int = 0,
    key_valid: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Softmax attention restricted to a causal window plus sink tokens, dense, fp32.

    Args:
        query: ``(b, H, q, d)``; key/value ``(b, H_kv, kv, d)``.
        window: visible tokens including the current one.
        sinks: the first ``sinks`` positions stay visible.
        key_valid: ``(b, kv)`` bool, False for padding keys.
        q_positions, k_positions: absolute positions (cache indices) of queries and keys.

    Returns:
        ``(b, q, H, d)``.
    """
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    qp, kp = _default_positions(q_len, kv_len, q_positions, k_positions, query.device)
    mask = sliding_window_bool_mask(qp, kp, window, sinks)[None, None].expand(b, 1, q_len, kv_len)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return reference_attention(query, key, value, mask, scaling=scaling)


def reference_feature_map(name: str, x: torch.Tensor, *, projection: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The linear-attention feature maps, written out plainly in fp32.

    Args:
        name: ``elu`` (``elu(x) + 1``), ``relu``, ``performer`` (FAVOR+ positive random features), ``taylor`` (2nd-order
            Taylor expansion of ``exp(q.k / sqrt(d))``, as in Based) or ``hedgehog`` (learnable ``x W + b`` with
            antithetic exponential features).
        x: ``(b, H, n, d)``.
        projection: performer/hedgehog random or learned matrix, ``(H, d, m)`` (one per head).
        bias: hedgehog bias ``(H, m)``.

    Returns:
        ``(b, H, n, m)`` features.
    """
    x = x.float()
    d = x.shape[-1]
    if name == "elu":
        return torch.nn.functional.elu(x) + 1.0
    if name == "relu":
        return torch.relu(x)
    if name == "taylor":
        xs = x / d**0.25  # so that phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d)
        ones = torch.ones_like(xs[..., :1])
        outer = torch.einsum("bhni,bhnj->bhnij", xs, xs).flatten(-2) / 2**0.5
        return torch.cat([ones, xs, outer], dim=-1)
    if name in ("performer", "hedgehog"):
        assert projection is not None
        xs = x / d**0.25
        z = torch.einsum("bhnd,hdm->bhnm", xs, projection.float())
        if bias is not None:
            z = z + bias.float()[None, :, None, :]
        sq = (xs * xs).sum(-1, keepdim=True) / 2
        m = projection.shape[-1]
        if name == "performer":
            return torch.exp(z - sq) / m**0.5
        return torch.cat([torch.exp(z - sq), torch.exp(-z - sq)], dim=-1) / (2 * m) ** 0.5
    raise ValueError(f"unknown feature map {name!r}")


def reference_linear_attention(
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    value: torch.Tensor,
    *,
    key_valid: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Causal linear attention as the explicit O(n^2) sum (Katharopoulos et al. 2020, eq. 3).

    ``out_i = sum_{j <= i} (phi(q_i) . phi(k_j)) v_j / (sum_{j <= i} phi(q_i) . phi(k_j) + eps)``; no softmax, no scale.

    Args:
        query_features: ``phi(Q)`` ``(b, H, q, m)``.
        key_features: ``phi(K)`` ``(b, H_kv, kv, m)``.
        value: ``(b, H_kv, kv, d)``.
        key_valid: ``(b, kv)`` bool, False for padding keys.

    Returns:
        ``(b, q, H, d)``.
    """
    b, h, q_len, _ = query_features.shape
    kv_len = key_features.shape[2]
    qp, kp = _default_positions(q_len, kv_len, q_positions, k_positions, query_features.device)
    fk = expand_kv(key_features.float(), h)
    v = expand_kv(value.float(), h)
    scores = torch.einsum("bhqm,bhkm->bhqk", query_features.float(), fk)
    visible = (kp[None, :] <= qp[:, None])[None, None]
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :]
    scores = scores * visible
    out = torch.einsum("bhqk,bhkd->bhqd", scores, v) / (scores.sum(-1, keepdim=True) + eps)
    return out.transpose(1, 2).to(value.dtype)


def reference_hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_features: torch.Tensor,
    key_features: torch.Tensor,
    *,
    window: int,
    log_gamma: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Linear attention with an exact softmax window in the same layer (LoLCATs), dense, fp32.

    ``out_i = (sum_{i-w<j<=i} g_h e^{s q_i.k_j} v_j + sum_{j<=i-w} phi(q_i).phi(k_j) v_j) / (the same sums without
    v_j)``: every visible key gets a weight, ``g_h e^{s q.k}`` inside the window and ``phi(q).phi(k)`` before it,
    and the output is their weighted mean. Written as a softmax over log-weights so that it cannot overflow.

    Args:
        query, key, value: ``(b, H, q, d)``, ``(b, H_kv, kv, d)``.
        query_features, key_features: ``phi(Q)`` ``(b, H, q, m)``, ``phi(K)`` ``(b, H_kv, kv, m)``.
        window: softmax window (visible tokens including the current one).
        log_gamma: ``(H,)`` log of the softmax part's weight per head.
        key_valid: ``(b, kv)`` bool, False for padding keys (a padded query still sees its own key).

    Returns:
        ``(b, q, H, d)``.
    """
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    qp, kp = _default_positions(q_len, kv_len, q_positions, k_positions, query.device)
    scale = d**-0.5 if scaling is None else scaling
    k, v = expand_kv(key.float(), h), expand_kv(value.float(), h)
    soft = torch.einsum("bhqd,bhkd->bhqk", query.float(), k) * scale + log_gamma.float()[None, :, None, None]
    prod = torch.einsum("bhqm,bhkm->bhqk", query_features.float(), expand_kv(key_features.float(), h))
    pos = prod > 0  # log(0) only through where(): its gradient would be NaN
    lin = torch.where(pos, torch.where(pos, prod, torch.ones_like(prod)).log(), torch.full_like(prod, float("-inf")))
    diff = qp[:, None] - kp[None, :]
    in_window = ((diff >= 0) & (diff < window))[None, None]
    older = (diff >= window)[None, None]
    logw = torch.where(in_window, soft, torch.where(older, lin, torch.full_like(lin, float("-inf"))))
    if key_valid is not None:  # a padded query keeps its own key: no empty row, no NaN reaching later layers
        logw = logw.masked_fill(~(key_valid[:, None, None, :] | (diff == 0)[None, None]), float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(logw, dim=-1), v)
    return out.transpose(1, 2).to(query.dtype)


def bigbird_random_blocks(query_block: int, num_key_blocks: int, random_blocks: int, seed: int, causal: bool) -> list[int]:
    """The random key blocks of one query block: ``random_blocks`` distinct blocks drawn with a generator seeded by
    ``(seed, query_block)``, among the earlier blocks (causal) or all ``num_key_blocks`` blocks (bidirectional).

    Depends only on its arguments, so prefill, chunked prefill and decode see the same pattern.
    """
    pool = query_block if causal else num_key_blocks
    if pool <= 0 or random_blocks <= 0:
        return []
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(query_block))
    perm = torch.randperm(pool, generator=g)
    return sorted(perm[: min(random_blocks, pool)].tolist())


def sparse_bool_mask(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    window: int,
    global_tokens: int,
    random_blocks: int,
    block_size: int,
    seed: int,
    causal: bool,
    num_key_blocks: int | None = None,
) -> torch.Tensor:
    """``(q, kv)`` BigBird-style pattern, by explicit loops.

    Key ``j`` is visible from query ``i`` when (``j <= i`` if causal) and any of: ``|i - j| < window`` (causal:
    ``i - j < window``); ``j < global_tokens``; ``i < global_tokens`` (global queries see every key); ``j``'s block is
    one of the random blocks of ``i``'s block (:func:`bigbird_random_blocks`).
    """
    if num_key_blocks is None:
        num_key_blocks = (int(k_positions.max()) // block_size + 1) if len(k_positions) else 0
    out = torch.zeros(len(q_positions), len(k_positions), dtype=torch.bool, device=q_positions.device)
    rand_cache: dict[int, set[int]] = {}
    for r, i in enumerate(q_positions.tolist()):
        qb = i // block_size
        if qb not in rand_cache:
            rand_cache[qb] = set(bigbird_random_blocks(qb, num_key_blocks, random_blocks, seed, causal))
        for c, j in enumerate(k_positions.tolist()):
            if causal and j > i:
                continue
            near = (i - j < window) if causal else (abs(i - j) < window)
            out[r, c] = near or j < global_tokens or i < global_tokens or (j // block_size) in rand_cache[qb]
    return out


def reference_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    global_tokens: int,
    random_blocks: int,
    block_size: int,
    seed: int,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Softmax attention under :func:`sparse_bool_mask`, dense, fp32. Returns ``(b, q, H, d)``."""
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    qp, kp = _default_positions(q_len, kv_len, q_positions, k_positions, query.device)
    if not causal and q_positions is None:
        qp = torch.arange(q_len, device=query.device)
    mask = sparse_bool_mask(
        qp, kp, window=window, global_tokens=global_tokens, random_blocks=random_blocks, block_size=block_size,
        seed=seed, causal=causal,
    )[None, None].expand(b, 1, q_len, kv_len)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return reference_attention(query, key, value, mask, scaling=scaling, is_causal=causal)
