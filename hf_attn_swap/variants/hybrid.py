"""Linear attention with an exact softmax window in the same layer (LoLCATs): ``swap_attention(model, "linear",
feature_map="hedgehog", window=64)``.

Every visible key gets a weight: ``g_h exp(s q.k)`` inside the last ``window`` tokens, ``phi(q).phi(k)`` before them,
and the output is their weighted mean (:func:`hf_attn_swap.reference.reference_hybrid_attention` writes it out
densely). Recent tokens, where softmax attention concentrates, stay exact; the far past costs a constant-size state.
``g_h = exp(log_gamma[h])`` is learned with the feature map (it starts at 1: with hedgehog's softmax-like
initialisation both parts are on the scale of ``exp(s q.k)``).

Computed as two parts merged by their normalisers, never by exponentiating unbounded scores:

* window: softmax over the band, blocked, with its log-sum-exp (explicit scores so that the log-sum-exp has a
  gradient: attention transfer trains through it; in inference on CPU the band kernel of :mod:`.band_cpu`).
  ``O(n * (window + block))`` time and memory;
* older keys: causal linear attention lagged by ``window`` (query ``i`` reads the state of keys ``<= i - window``),
  chunked, continuing from the cache's state;
* ``out = a * o_window + (1 - a) * num / den`` with ``a = sigmoid(lse_window + log g - log den)``.

Decode keeps the last ``window - 1`` keys/values and the state of the older ones
(:class:`.cache_layers.HybridStateLayer`): memory is bounded by the window whatever the context length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import reference_hybrid_attention
from . import band_cpu
from ._common import current_cache_layer, in_reference_mode
from .cache_layers import HybridStateLayer
from .linear import chunked_linear_terms  # linear imports this module only inside its attention function

#: queries per block of the window part.
BLOCK = 64
_TINY = 1e-30  # den of a query with no key before its window is exactly 0; its weight then goes all to the window


def band_softmax_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    q_start: int,
    k_start: int,
    window: int,
    key_valid: torch.Tensor | None,
    scaling: float | None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the causal window, with its log-sum-exp.

    Args:
        query: ``(b, H, q, d)`` at positions ``q_start ..``; key/value ``(b, H_kv, kv, d)`` at the contiguous positions
            ``k_start .. k_start + kv - 1`` (ending with the last query).
        key_valid: ``(b, kv)``; a padded query still sees its own key, so that no row is empty.

    Returns:
        ``o (b, H, q, d)`` and ``lse (b, H, q)``, fp32.
    """
    b, h, q_len, d = query.shape
    h_kv = key.shape[1]
    g = h // h_kv
    scale = d**-0.5 if scaling is None else scaling
    if (key_valid is None or bool(key_valid.all())) and band_cpu.usable(query, key, value):
        # Inference on CPU: the band kernel returns the same output and log-sum-exp (no gradient, hence not in
        # attention transfer, which takes the explicit scores below).
        return band_cpu.band_attention(query, key, value, q_offset=q_start - k_start, window=window, scale=scale,
                                       want_lse=True)
    outs, lses = [], []
    for i0 in range(0, q_len, block):
        i1 = min(q_len, i0 + block)
        nq = i1 - i0
        ks = max(0, q_start + i0 - window + 1 - k_start)
        ke = q_start + i1 - k_start
        kb, vb = key[:, :, ks:ke].float(), value[:, :, ks:ke].float()
        qb = query[:, :, i0:i1].float().reshape(b, h_kv, g * nq, d)  # the group's heads share the block's keys
        scores = (qb @ kb.transpose(-1, -2)) * scale  # (b, H_kv, g*nq, nk)
        qp = torch.arange(q_start + i0, q_start + i1, device=query.device)[:, None]
        kp = torch.arange(k_start + ks, k_start + ke, device=query.device)[None, :]
        diff = qp - kp
        vis = ((diff >= 0) & (diff < window))[None]
        if key_valid is not None:
            vis = vis & (key_valid[:, None, ks:ke] | (diff == 0)[None])
        vis = vis.repeat(1, g, 1)[:, None]  # (b|1, 1, g*nq, nk)
        scores = scores.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append((torch.exp(scores - lse[..., None]) @ vb).reshape(b, h, nq, d))
        lses.append(lse.reshape(b, h, nq))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _add_to_state(s, z, k_feat, v):
    """State plus the keys ``k_feat (b, H_kv, n, m)`` with values ``(b, H_kv, n, d)``."""
    ds = torch.einsum("bhnm,bhnd->bhmd", k_feat, v.float())
    dz = k_feat.sum(2)
    return (ds, dz) if s is None else (s + ds, z + dz)


def hybrid_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    fmap: nn.Module,
    window: int,
    chunk_size: int,
    scaling: float | None,
) -> torch.Tensor:
    """The ``linear`` variant with ``window > 0``. Returns ``(b, q, H, d)``."""
    from .sliding_window import key_layout

    b, h, q_len, d = query.shape
    layer = current_cache_layer(module)
    cache = layer if isinstance(layer, HybridStateLayer) else None
    positions, valid, total = key_layout(module, key, attention_mask, b, q_len)
    p0, k0 = total - q_len, int(positions[0]) if positions.numel() else 0
    if cache is not None and cache.state_s is not None:
        s, z, upto = cache.state_s, cache.state_z, cache.state_upto
    else:
        s, z, upto = None, None, k0  # no state: nothing before the keys this call received
    q_feat = fmap(query, "q")
    log_gamma = fmap.log_gamma

    def k_feat_of(i0: int, i1: int) -> torch.Tensor:
        # Features of keys i0..i1-1 only: in decode just the one key leaving the window needs them, not all W.
        return fmap(key[:, :, i0:i1], "k") * valid[:, None, i0:i1, None]

    if in_reference_mode() and s is None:
        out = reference_hybrid_attention(
            query, key, value, q_feat, k_feat_of(0, key.shape[2]), window=window, log_gamma=log_gamma, key_valid=valid,
            q_positions=torch.arange(p0, total, device=query.device), k_positions=positions, scaling=scaling)
    else:
        out = None

    # Keys older than every query's window, not yet in the state: all queries read them, so they join the state.
    lo, hi = max(upto, k0) - k0, max(0, p0 - window + 1 - k0)
    if hi > lo:
        s, z = _add_to_state(s, z, k_feat_of(lo, hi), value[:, :, lo:hi])
        upto = k0 + hi
    # Query u (position p0 + u) also reads positions p0 - window + 1 .. p0 + u - window: a causal scan over slots
    # where slot t carries position p0 - window + t (slot 0's position is already in the state).
    first = max(upto, k0, p0 - window + 1)  # first position a slot may carry
    last = total - 1 - window  # the last query's newest older key
    if last >= first:
        src = k_feat_of(first - k0, last - k0 + 1)
        vsrc = value[:, :, first - k0 : last - k0 + 1]
        front = first - (p0 - window)
        slot_k = F.pad(src, (0, 0, front, q_len - front - src.shape[2]))
        slot_v = F.pad(vsrc, (0, 0, front, q_len - front - vsrc.shape[2]))
    else:
        slot_k = q_feat.new_zeros(b, key.shape[1], q_len, q_feat.shape[-1])
        slot_v = value.new_zeros(b, value.shape[1], q_len, value.shape[-1])
    num, den, s_new, z_new = chunked_linear_terms(q_feat, slot_k, slot_v, s, z, chunk_size=chunk_size)

    if cache is not None:
        # The cache keeps positions > total - window; the key at total - window leaves it now and joins the state.
        p_add = total - window
        if p_add >= max(upto, k0):
            s_new, z_new = _add_to_state(s_new, z_new, k_feat_of(p_add - k0, p_add - k0 + 1),
                                         value[:, :, p_add - k0 : p_add - k0 + 1])
        cache.state_s, cache.state_z = s_new, z_new
        cache.state_upto = max(upto, total - window + 1, 0)
    if out is not None:
        return out

    o_w, lse_w = band_softmax_lse(query, key, value, q_start=p0, k_start=k0, window=window, key_valid=valid,
                                  scaling=scaling)
    o_w, lse_w = o_w.transpose(1, 2), lse_w.transpose(1, 2)[..., None]  # (b, q, H, d), (b, q, H, 1)
    den = den.clamp_min(_TINY)
    a = torch.sigmoid(lse_w + log_gamma.float()[None, None, :, None] - den.log())
    return (a * o_w + (1 - a) * (num / den)).to(query.dtype)

