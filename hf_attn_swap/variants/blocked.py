"""Blocked local attention: each block of queries attends only to the keys inside its window (plus sink tokens).

Work is ``O(n * (window + block + sinks))`` instead of ``O(n^2)``: a dense SDPA call with a window mask still does the
full ``n^2`` work (the mask only hides it), so the keys are sliced per query block before the kernel sees them.

Three paths:

* the band kernel (``band_cpu.c``, inference in fp32 on x86-64 with AVX2, no padding): every query, sinks
  included. It computes only the tiles that touch the band: ~1.5x faster than the SDPA blocks below.
* else the *interior* (queries whose whole window lies inside the keys, no padding): one SDPA call over all blocks,
  the keys of each block an overlapping strided view of K/V (no copy: measured faster than copying them, the blocks
  share cache lines), one float band mask shared by every block (a bool mask is converted to float on every call),
  GQA folded into the query rows.
* everything else (the first window, padded batches, sinks under autograd): the general masked path.

On the SDPA interior, sinks are merged in by log-sum-exp (CPU, no grad).
"""

from __future__ import annotations

import torch

from ..hf_compat import cpu_flash_attention, cpu_flash_lse_available
from . import band_cpu
from ._common import grouped_kv

#: queries per block; small blocks waste less of the band (``block - 1`` extra columns), large ones cost fewer calls.
DEFAULT_BLOCK = 64


def default_block(window: int) -> int:
    """A block size for a window: an eighth of it, between 32 and 256 (the band then wastes ~12%; measured best at
    w=512 on CPU, where 32-query blocks run SDPA less efficiently and 128 waste more)."""
    return int(min(256, max(32, window // 8)))


def _blocked_general(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    q_start: int,
    n_sink: int,
    tail_start: int,
    window: int,
    sinks: int = 0,
    key_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    block: int | None = None,
) -> torch.Tensor:
    """The general path of :func:`blocked_local_attention` (any layout, padding, sinks; masks built per block).
    """
    b, h, q_len, d = query.shape
    h_kv = key.shape[1]
    dev = query.device
    tail_k, tail_v = key[:, :, n_sink:], value[:, :, n_sink:]
    tail_valid = key_valid[:, n_sink:] if key_valid is not None else None
    if n_sink:
        sink_k, sink_v = key[:, :, :n_sink], value[:, :, :n_sink]
        sink_valid = key_valid[:, :n_sink] if key_valid is not None else None
    else:  # nothing evicted yet: the sinks are the head of the tail
        n_avail = min(sinks, tail_k.shape[2]) if tail_start == 0 else 0
        sink_k, sink_v = tail_k[:, :, :n_avail], tail_v[:, :, :n_avail]
        sink_valid = tail_valid[:, :n_avail] if tail_valid is not None else None
    n_use = max(0, min(sink_k.shape[2], q_start + q_len - window))  # sinks some query sees outside its window
    blk = block or default_block(window)
    nb = -(-q_len // blk)
    pad_end = nb * blk - q_len
    width = blk + window - 1
    # Front-pad the tail so block i's keys start at i * blk in the padded tensor: all blocks are one strided view.
    front = max(0, (window - 1) - (q_start - tail_start))
    o0 = q_start - tail_start - (window - 1) + front
    kpad = torch.nn.functional.pad(tail_k, (0, 0, front, pad_end))[:, :, o0:]
    vpad = torch.nn.functional.pad(tail_v, (0, 0, front, pad_end))[:, :, o0:]
    vb = b if tail_valid is not None else 1
    valid = torch.zeros(vb, front + tail_k.shape[2] + pad_end, dtype=torch.bool, device=dev)
    valid[:, front : front + tail_k.shape[2]] = tail_valid if tail_valid is not None else True
    valid_unf = valid[:, o0:].unfold(1, width, blk)  # (vb, nb, width)
    r = torch.arange(blk, device=dev)[:, None]
    c = torch.arange(width, device=dev)[None, :]
    band = (c >= r) & (c <= r + window - 1)  # key c of a block sits at position block_start - (window - 1) + c
    mask_w = band[None, None] & valid_unf[:, :, None, :]  # (vb, nb, blk, width)
    if n_use:
        qp = q_start + torch.arange(nb * blk, device=dev).reshape(nb, blk, 1)
        s_mask = (torch.arange(n_use, device=dev)[None, None, :] <= qp - window)[None]  # (1, nb, blk, n_use)
        if sink_valid is not None:
            s_mask = s_mask & sink_valid[:, None, None, :n_use]
        sb = max(s_mask.shape[0], mask_w.shape[0])
        mask_w = torch.cat([s_mask.expand(sb, nb, blk, n_use), mask_w.expand(sb, nb, blk, width)], dim=-1)
    qpad = torch.nn.functional.pad(query, (0, 0, 0, pad_end))
    # Groups of blocks per SDPA call bound the memory of the unfolded keys (~4k queries per call).
    per_call = max(1, 4096 // blk)
    outs = []
    for g0 in range(0, nb, per_call):
        g1 = min(nb, g0 + per_call)
        ng = g1 - g0
        qg = qpad[:, :, g0 * blk : g1 * blk].reshape(b, h, ng, blk, d).transpose(1, 2).reshape(b * ng, h, blk, d)
        kv_span = slice(g0 * blk, (g1 - 1) * blk + width)
        kg = kpad[:, :, kv_span].unfold(2, width, blk).permute(0, 2, 1, 4, 3)  # (b, ng, h_kv, width, d)
        vg = vpad[:, :, kv_span].unfold(2, width, blk).permute(0, 2, 1, 4, 3)
        if n_use:
            sk = sink_k[:, None, :, :n_use].expand(b, ng, h_kv, n_use, d)
            sv = sink_v[:, None, :, :n_use].expand(b, ng, h_kv, n_use, d)
            kg, vg = torch.cat([sk, kg], dim=3), torch.cat([sv, vg], dim=3)
        kg = kg.reshape(b * ng, h_kv, -1, d)
        vg = vg.reshape(b * ng, h_kv, -1, d)
        mg = mask_w[:, g0:g1]
        mg = mg.expand(b, ng, blk, mg.shape[-1]).reshape(b * ng, 1, blk, mg.shape[-1])
        kg, vg, gqa = grouped_kv(kg, vg, h)
        og = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mg, dropout_p=dropout,
                                                              scale=scaling, **gqa)
        outs.append(og.reshape(b, ng, h, blk, d))
    out = torch.cat(outs, dim=1).permute(0, 1, 3, 2, 4).reshape(b, nb * blk, h, d)
    return out[:, :q_len]


def _interior_band(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, *, window: int, block: int,
    scaling: float | None,
) -> torch.Tensor | None:
    """Band attention for queries whose full window is present: ``query`` ``(b, H, m, d)`` at positions ``P..P+m-1``,
    ``key``/``value`` ``(b, H_kv, m + window - 1, d)`` at positions ``P-window+1 .. P+m-1``.

    Writes the output into ``out`` ``(b, H, m, d)``; returns the log-sum-exp ``(b, H, m)`` when computed through the
    CPU flash op (for merging sinks), else ``None``.
    """
    b, h, m, d = query.shape
    h_kv = key.shape[1]
    grp = h // h_kv
    nb, rest = divmod(m, block)
    width = block + window - 1
    r = torch.arange(block, device=query.device)[:, None]
    c = torch.arange(width, device=query.device)[None, :]
    band = (c >= r) & (c <= r + window - 1)
    mask = torch.zeros(block, width, dtype=query.dtype, device=query.device).masked_fill(~band, float("-inf"))
    want_lse = _lse_op_usable(query)
    lse = query.new_empty(b, h, m) if want_lse else None
    for start, count, rows in ((0, nb, block), (nb * block, 1 if rest else 0, rest)):
        if not count:
            continue
        w_ = rows + window - 1
        span = slice(start, start + (count - 1) * rows + w_)
        q_ = query[:, :, start : start + count * rows]
        # Blocks go in SDPA's head dimension and (batch, KV head) in its batch dimension, so that queries and output
        # stay views of (b, H, m, d); a GQA group's heads are folded into the query rows of their KV head's blocks.
        q_ = q_.reshape(b * h_kv, grp, count, rows, d)
        q_ = q_.reshape(b * h_kv, count, rows, d) if grp == 1 else q_.transpose(1, 2).reshape(b * h_kv, count, grp * rows, d)
        k_ = key[:, :, span].unfold(2, w_, rows).transpose(-1, -2).reshape(b * h_kv, count, w_, d)
        v_ = value[:, :, span].unfold(2, w_, rows).transpose(-1, -2).reshape(b * h_kv, count, w_, d)
        m_ = mask[:rows, :w_].repeat(grp, 1)[None, None]
        if want_lse:
            o_, l_ = _flash_cpu(q_, k_, v_, attn_mask=m_, scale=scaling)
            lse[:, :, start : start + count * rows] = (
                l_.reshape(b, h_kv, count, grp, rows).transpose(2, 3).reshape(b, h, count * rows))
        else:
            o_ = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=m_, scale=scaling)
        out[:, :, start : start + count * rows] = (
            o_.reshape(b, h_kv, count, grp, rows, d).transpose(2, 3).reshape(b, h, count * rows, d))
    return lse


def _flash_cpu(q, k, v, *, attn_mask, scale):
    """CPU flash kernel returning (output, log-sum-exp); the public SDPA drops the latter."""
    return cpu_flash_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _lse_op_usable(query: torch.Tensor) -> bool:
    # The op's log-sum-exp has no gradient, so the merge is inference-only; it exists on CPU from torch 2.3.
    return (query.device.type == "cpu" and not torch.is_grad_enabled()
            and cpu_flash_lse_available())


def _merge_sinks(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, sink_k: torch.Tensor,
                 sink_v: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Add, in place, the attention to sink keys (all visible to these queries) to ``out`` (b, H, m, d), weighting
    both parts by their log-sum-exp: softmax over the union of key sets, exactly."""
    b, h, m, d = query.shape
    h_kv = sink_k.shape[1]
    grp = h // h_kv
    scale = scaling if scaling is not None else d ** -0.5
    qg = query.reshape(b, h_kv, grp * m, d)
    s = torch.matmul(qg, sink_k.transpose(-1, -2)) * scale  # (b, H_kv, grp*m, S)
    lse_s = torch.logsumexp(s, dim=-1)
    o_s = torch.matmul(torch.softmax(s, dim=-1), sink_v)  # (b, H_kv, grp*m, d)
    o_s = o_s.reshape(b, h, m, d)
    # softmax over the union = (e^lse * band + e^lse_s * sinks) / (e^lse + e^lse_s): a lerp by sigmoid(lse_s - lse).
    return out.lerp_(o_s, torch.sigmoid(lse_s.reshape(b, h, m) - lse)[..., None])


def blocked_local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    q_start: int,
    n_sink: int,
    tail_start: int,
    window: int,
    sinks: int = 0,
    key_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    block: int | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention with sinks over keys laid out ``[sinks][contiguous tail]``.

    Args:
        query: ``(b, H, q, d)`` at positions ``q_start .. q_start + q - 1``.
        key, value: ``(b, H_kv, n_sink + L, d)``: the first ``n_sink`` keys are at positions ``0..n_sink-1`` (kept
            sinks of an evicting cache), the rest at ``tail_start .. tail_start + L - 1`` (ending at the last query).
        window: key ``j`` visible from query ``i`` when ``i - window < j <= i``.
        sinks: and when ``j < sinks``.
        key_valid: ``(b, n_sink + L)`` bool, False for padding.
        block: queries per block (default :func:`default_block`).

    Returns:
        ``(b, q, H, d)``.
    """
    b, h, q_len, d = query.shape
    blk = block or default_block(window)
    # Interior: every key of the window present (tail_start + window - 1 <= position) and every sink outside it.
    n_sinks_seen = n_sink if n_sink else (min(sinks, key.shape[2]) if tail_start == 0 else 0)
    first = max(tail_start + window - 1, window + n_sinks_seen - 1 if n_sinks_seen else 0)
    sinks_need_merge = n_sinks_seen > 0
    unpadded = dropout == 0.0 and (key_valid is None or bool(key_valid.all()))
    tail_k, tail_v = key[:, :, n_sink:], value[:, :, n_sink:]
    sk = key[:, :, :n_sink] if n_sink else tail_k[:, :, :n_sinks_seen]
    sv = value[:, :, :n_sink] if n_sink else tail_v[:, :, :n_sinks_seen]
    if unpadded and band_cpu.usable(query, key, value):  # every query, sinks included, in one call
        out, _ = band_cpu.band_attention(query, tail_k, tail_v, q_offset=q_start - tail_start, window=window,
                                         scale=scaling if scaling is not None else d**-0.5, sink_key=sk,
                                         sink_value=sv, key_start=tail_start)
        return out.transpose(1, 2)
    s0 = max(0, first - q_start)
    fast = unpadded and q_len - s0 >= blk and (not sinks_need_merge or _lse_op_usable(query))
    if not fast:
        return _blocked_general(query, key, value, q_start=q_start, n_sink=n_sink, tail_start=tail_start,
                                window=window, sinks=sinks, key_valid=key_valid, scaling=scaling, dropout=dropout,
                                block=block)
    # Built as (b, H, q, d) (SDPA's own layout, so the interior's output lands with one contiguous copy) and
    # returned as the (b, q, H, d) view the attention contract asks for.
    out = query.new_empty(b, h, q_len, d)
    if s0 and q_start == tail_start and not n_sink:
        # Fresh prefill: every query before the interior sees all keys up to itself (its window and the sinks cover
        # them), which is plain causal attention.
        hk, hv, gqa = grouped_kv(key[:, :, :s0], value[:, :, :s0], h)
        out[:, :, :s0] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, :s0], hk, hv, is_causal=True, scale=scaling, **gqa)
    elif s0:  # the general path on the queries before the interior, keys up to their last one
        keep = n_sink + (q_start + s0 - tail_start)
        valid = key_valid[:, :keep] if key_valid is not None else None
        out[:, :, :s0] = _blocked_general(
            query[:, :, :s0], key[:, :, :keep], value[:, :, :keep], q_start=q_start, n_sink=n_sink,
            tail_start=tail_start, window=window, sinks=sinks, key_valid=valid, scaling=scaling, block=block,
        ).transpose(1, 2)
    qi = query[:, :, s0:]
    k0 = q_start + s0 - (window - 1) - tail_start  # index in the tail of the first interior query's first key
    lse = _interior_band(qi, tail_k[:, :, k0:], tail_v[:, :, k0:], out[:, :, s0:], window=window, block=blk,
                         scaling=scaling)
    if sinks_need_merge:
        _merge_sinks(out[:, :, s0:], lse, qi, sk, sv, scaling)
    return out.transpose(1, 2)
