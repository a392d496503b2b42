"""BigBird-style sparse attention: ``swap_attention(model, "sparse", window=W, global_tokens=G, random_blocks=R, seed=0)``.

Pattern (:func:`hf_attn_swap.reference.sparse_bool_mask` is its dense definition): a token window (``i - j < W``
causal, ``|i - j| < W`` bidirectional), ``G`` global tokens (everyone sees them; in bidirectional models they also see
everyone), and ``R`` random key blocks of ``block_size`` tokens per query block, drawn from a generator seeded by
``(seed, query block)`` so prefill and decode agree. Causal models (decoders) use the causal pattern, encoders
(BERT) the bidirectional one.

Compute is block-sparse: each query block gathers only its window, global and random key blocks and runs one SDPA call
over them (``O(n * (W + G + R * block_size))``). Decode steps (a few queries) use a mask over the kept keys; the
decoder cache keeps every key (random blocks can reach anywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from ..configs import VariantConfig
from ..reference import bigbird_random_blocks, reference_sparse_attention
from ..registry import default_mask, register_variant
from ._common import (
    add_cache_hooks, attention_sites_of, grouped_kv, in_reference_mode, remove_cache_hooks, swap_config,
)
from .cache_layers import KVWindowLayer
from .gqa import FOLD_MAX_QUERY, grouped_attention
from .sliding_window import check_no_softcap, key_layout


@dataclass
class SparseConfig(VariantConfig):
    """Options of ``sparse``.

    Attributes:
        window: local window in tokens (causal: ``i - window < j <= i``), >= 1.
        global_tokens: the first ``G`` tokens are global, >= 0.
        random_blocks: random key blocks per query block, >= 0.
        block_size: tokens per block (random blocks and the block-sparse compute), >= 1.
        seed: seed of the random blocks.
    """

    window: int = 64
    global_tokens: int = 0
    random_blocks: int = 0
    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("window", 1), ("global_tokens", 0), ("random_blocks", 0), ("block_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

    def blocks_per_query_block(self) -> int:
        """Key blocks one query block reads at most (window both sides, global, random)."""
        bs = self.block_size
        return 2 * math.ceil((self.window - 1) / bs) + 1 + math.ceil(self.global_tokens / bs) + self.random_blocks

    def check_model(self, model: Any, layers: list[int]) -> None:
        check_no_softcap(model, "sparse")
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if max_pos:
            need = self.window + self.global_tokens + self.random_blocks * self.block_size
            if self.block_size > max_pos or need > max_pos:
                raise ValueError(
                    f"sparse blocks do not fit the model's context of {max_pos} tokens: window ({self.window}) + "
                    f"global_tokens ({self.global_tokens}) + random_blocks x block_size ({self.random_blocks} x "
                    f"{self.block_size}) = {need}; allowed: block_size <= {max_pos} and that sum <= {max_pos}"
                )

    def make_cache_layer(self) -> KVWindowLayer:
        return KVWindowLayer(window=None)


@lru_cache(maxsize=64)
def _random_table(nb_q: int, nb_k: int, r: int, seed: int, causal: bool) -> torch.Tensor:
    t = torch.zeros(nb_q, nb_k, dtype=torch.bool)
    for qb in range(nb_q):
        blocks = bigbird_random_blocks(qb, nb_k, r, seed, causal)
        if blocks:
            t[qb, blocks] = True
    return t


def _pattern(qp, kp, cfg: SparseConfig, causal: bool, rand: torch.Tensor) -> torch.Tensor:
    """Token-level pattern for query positions ``qp`` (..., 1) and key positions ``kp`` (..., k); broadcasting."""
    diff = qp - kp
    near = (diff < cfg.window) if causal else (diff.abs() < cfg.window)
    vis = near | (kp < cfg.global_tokens) | rand
    if not causal:
        vis = vis | (qp < cfg.global_tokens)
    else:
        vis = vis & (diff >= 0)
    return vis


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cfg: SparseConfig,
    *,
    causal: bool,
    key_valid: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Prefill over keys at positions ``0..n-1`` with queries at the same positions. Returns ``(b, n, H, d)``."""
    b, h, n, d = query.shape
    h_kv = key.shape[1]
    bs = cfg.block_size
    nb = math.ceil(n / bs)
    pad = nb * bs - n
    dev = query.device
    rand = _random_table(nb, nb, cfg.random_blocks, cfg.seed, causal).to(dev)
    # Key blocks each query block reads (sorted, unique), padded with a dummy block (index nb) masked out.
    wb = math.ceil((cfg.window - 1) / bs)
    gb = math.ceil(cfg.global_tokens / bs)
    sets = []
    for qb in range(nb):
        hi = qb if causal else min(nb - 1, qb + wb)
        s = set(range(max(0, qb - wb), hi + 1)) | set(range(min(gb, nb))) | set(rand[qb].nonzero().flatten().tolist())
        sets.append(sorted(s))
    kmax = max(len(s) for s in sets)
    idx = torch.full((nb, kmax), nb, dtype=torch.long)
    for qb, s in enumerate(sets):
        idx[qb, : len(s)] = torch.tensor(s, dtype=torch.long)
    idx = idx.to(dev)
    kpad = F.pad(key, (0, 0, 0, pad + bs)).reshape(b, h_kv, nb + 1, bs, d)
    vpad = F.pad(value, (0, 0, 0, pad + bs)).reshape(b, h_kv, nb + 1, bs, d)
    kg = kpad[:, :, idx].reshape(b, h_kv, nb, kmax * bs, d).transpose(1, 2).reshape(b * nb, h_kv, kmax * bs, d)
    vg = vpad[:, :, idx].reshape(b, h_kv, nb, kmax * bs, d).transpose(1, 2).reshape(b * nb, h_kv, kmax * bs, d)
    qpad = F.pad(query, (0, 0, 0, pad)).reshape(b, h, nb, bs, d).transpose(1, 2).reshape(b * nb, h, bs, d)
    # Token-level mask (nb, bs, kmax*bs).
    qp = torch.arange(nb * bs, device=dev).reshape(nb, bs, 1)
    kp = (idx[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(nb, 1, kmax * bs)
    rand_k = torch.cat([rand, torch.zeros(nb, 1, dtype=torch.bool, device=dev)], 1).gather(1, idx)  # (nb, kmax)
    rand_k = rand_k[:, :, None].expand(nb, kmax, bs).reshape(nb, 1, kmax * bs)
    mask = _pattern(qp, kp, cfg, causal, rand_k) & (kp < n)
    if key_valid is not None:
        vpadded = torch.cat([key_valid, torch.zeros(b, pad + bs, dtype=torch.bool, device=dev)], 1)
        kvalid = vpadded.reshape(b, nb + 1, bs)[:, idx].reshape(b, nb, 1, kmax * bs)
        mask = (mask[None] & kvalid).reshape(b * nb, 1, bs, kmax * bs)
    else:
        mask = mask[:, None].repeat(b, 1, 1, 1) if b > 1 else mask[:, None]
    kg, vg, kw = grouped_kv(kg, vg, h)
    out = F.scaled_dot_product_attention(qpad, kg, vg, attn_mask=mask, dropout_p=dropout, scale=scaling, **kw)
    out = out.reshape(b, nb, h, bs, d).permute(0, 1, 3, 2, 4).reshape(b, nb * bs, h, d)[:, :n]
    if not causal and cfg.global_tokens:
        # Global queries see every key: dense rows for them (G x n, cheap).
        g = min(cfg.global_tokens, n)
        m = (key_valid[:, None, None, :].expand(b, 1, g, n) if key_valid is not None
             else torch.ones(1, 1, g, n, dtype=torch.bool, device=dev))
        dense = grouped_attention(None, query[:, :, :g], key, value, m, scaling=scaling)[0]
        out = torch.cat([dense, out[:, g:]], dim=1)
    return out


def sparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """BigBird-style attention (window + global + random blocks), block-sparse in prefill. ``(b, q, H, d)``."""
    cfg = swap_config(module, SparseConfig)
    causal = bool(getattr(module, "is_causal", True))
    b, h, q_len, d = query.shape
    kv = key.shape[2]
    positions, valid, total = key_layout(module, key, attention_mask, b, q_len)
    q_start = total - q_len if causal else 0
    qpos = torch.arange(q_start, q_start + q_len, device=query.device)
    if in_reference_mode():
        out = reference_sparse_attention(
            query, key, value, window=cfg.window, global_tokens=cfg.global_tokens, random_blocks=cfg.random_blocks,
            block_size=cfg.block_size, seed=cfg.seed, causal=causal, key_valid=valid, q_positions=qpos,
            k_positions=positions, scaling=scaling,
        )
        return out, None
    any_pad = not bool(valid.all())
    if q_len == kv and q_len > FOLD_MAX_QUERY:
        out = block_sparse_attention(query, key, value, cfg, causal=causal, key_valid=valid if any_pad else None,
                                     scaling=scaling, dropout=dropout)
        return out, None
    # Decode / chunks over a cache: a mask over the kept keys (every key: random blocks reach anywhere).
    nb_k = math.ceil(total / cfg.block_size)
    nb_q = int(qpos[-1]) // cfg.block_size + 1
    rand = _random_table(nb_q, nb_k, cfg.random_blocks, cfg.seed, causal).to(query.device)
    rand_tok = rand[(qpos // cfg.block_size)[:, None], (positions // cfg.block_size)[None, :]]
    mask = _pattern(qpos[:, None], positions[None, :], cfg, causal, rand_tok)[None, None]
    if any_pad:
        mask = mask & valid[:, None, None, :]
    return grouped_attention(module, query, key, value, mask, dropout=dropout, scaling=scaling)


def _prepare(model, config, layers) -> None:
    for m in attention_sites_of(model, layers):
        add_cache_hooks(m)


def _restore(model, layers) -> None:
    for m in attention_sites_of(model, layers):
        remove_cache_hooks(m)


register_variant(
    "sparse",
    sparse_attention,
    config=SparseConfig,
    mask_fn=default_mask,
    prepare=_prepare,
    restore=_restore,
    description="BigBird-style sparse attention: window + global tokens + seeded random blocks, block-sparse compute",
)
