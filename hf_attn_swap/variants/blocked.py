"""Blocked local attention: each block of queries attends only to the keys inside its window (plus sink tokens).

Work is ``O(n * (window + block + sinks))`` instead of ``O(n^2)``: a dense SDPA call with a window mask still does the
full ``n^2`` work (the mask only hides it), so the keys are sliced per query block before the kernel sees them. Each
block is one SDPA call (the CPU flash kernel), GQA through ``enable_gqa`` / the grouped fold, never ``repeat_kv``.
"""

from __future__ import annotations

import torch

#: queries per block; small blocks waste less of the band (``block - 1`` extra columns), large ones cost fewer calls.
DEFAULT_BLOCK = 64


def default_block(window: int) -> int:
    """A block size for a window: an eighth of it, between 32 and 256 (the band then wastes ~12%; measured best at
    w=512 on CPU, where 32-query blocks run SDPA less efficiently and 128 waste more)."""
    return int(min(256, max(32, window // 8)))


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
    gqa = {"enable_gqa": True} if h_kv != h else {}
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
        og = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mg, dropout_p=dropout,
                                                              scale=scaling, **gqa)
        outs.append(og.reshape(b, ng, h, blk, d))
    out = torch.cat(outs, dim=1).permute(0, 1, 3, 2, 4).reshape(b, nb * blk, h, d)
    return out[:, :q_len]
