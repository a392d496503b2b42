"""Fast paths of sliding_window / linear / sparse / flash held to hf_attn_swap.reference, on random tensors (fp32)."""

from __future__ import annotations

import pytest
import torch

from hf_attn_swap.reference import (
    reference_attention,
    reference_feature_map,
    reference_linear_attention,
    reference_sliding_window_attention,
    reference_sparse_attention,
)
from hf_attn_swap.variants import band_cpu
from hf_attn_swap.variants import blocked as blocked_mod
from hf_attn_swap.variants.blocked import blocked_local_attention
from hf_attn_swap.variants.cache_layers import KVWindowLayer, LinearStateLayer
from hf_attn_swap.variants.feature_maps import FEATURE_MAPS, FeatureMap
from hf_attn_swap.variants.linear import chunked_linear_attention
from hf_attn_swap.variants.sparse import SparseConfig, block_sparse_attention

TOL = 2e-5  # fp32: different summation orders


def _qkv(b=2, h=4, h_kv=2, n=50, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h_kv, n, d, generator=g),
            torch.randn(b, h_kv, n, d, generator=g))


def _left_pad_valid(b, n, pad=7):
    v = torch.ones(b, n, dtype=torch.bool)
    v[-1, :pad] = False
    return v


# ------------------------------------------------------------------ sliding window


def _choose_band_path(path, monkeypatch):
    """"kernel": the C band kernel (must be built here); "sdpa": the SDPA blocks it replaces where it cannot run."""
    if path == "kernel":
        if (reason := band_cpu.unavailable_reason()) is not None:
            pytest.skip(f"band kernel cannot run here: {reason}")
        assert band_cpu.available(), "the band kernel did not build on this machine"
    else:
        monkeypatch.setattr(band_cpu, "_off", 1)


@pytest.mark.parametrize(
    "n,window,sinks,block,h_kv,padded",
    [(50, 8, 0, 16, 2, False), (50, 8, 3, 16, 4, False), (50, 13, 2, 5, 1, True), (33, 1, 0, 8, 2, False),
     (40, 64, 0, 16, 2, True), (64, 16, 4, 16, 2, True)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("path", ["kernel", "sdpa"])
def test_blocked_sliding_window_matches_reference(n, window, sinks, block, h_kv, padded, path, monkeypatch):
    _choose_band_path(path, monkeypatch)
    q, k, v = _qkv(n=n, h_kv=h_kv)
    valid = _left_pad_valid(2, n) if padded else None
    fast = blocked_local_attention(q, k, v, q_start=0, n_sink=0, tail_start=0, window=window, sinks=sinks,
                                   key_valid=valid, scaling=0.3, block=block)
    ref = reference_sliding_window_attention(q, k, v, window=window, sinks=sinks, key_valid=valid, scaling=0.3)
    rows = valid if valid is not None else torch.ones(2, n, dtype=torch.bool)
    assert torch.allclose(fast[rows], ref[rows], atol=TOL), (fast - ref)[rows].abs().max()


# The band kernel has no backward: under autograd the SDPA path runs.
@pytest.mark.parametrize("grad,path", [(False, "kernel"), (False, "sdpa"), (True, "sdpa")],
                         ids=["kernel", "sdpa", "sdpa_grad"])
@pytest.mark.parametrize(
    "layout", ["fresh", "chunk_after_cache", "evicted_with_sinks"],
)
@pytest.mark.parametrize("sinks,h_kv", [(0, 4), (3, 2), (2, 1)], ids=lambda v: str(v))
def test_blocked_interior_path_matches_reference(layout, sinks, h_kv, grad, path, monkeypatch):
    """Sequences much longer than the window take the interior path: without autograd the band kernel, or (where it
    cannot run, and under autograd) strided SDPA blocks with a shared band mask; sinks merged by log-sum-exp without
    grad. Outputs and, with grad, input gradients equal the dense reference."""
    _choose_band_path(path, monkeypatch)
    n, window, block, b = 97, 12, 8, 2
    if layout == "fresh":
        q_start, tail_start, n_sink, kv_len = 0, 0, 0, n
    elif layout == "chunk_after_cache":
        q_start, tail_start, n_sink, kv_len = 30, 0, 0, 30 + n
    else:  # a bounded cache: sinks kept apart, then the last window - 1 old tokens, then the chunk
        q_start, n_sink = 300, sinks
        tail_start = q_start - (window - 1)
        kv_len = n_sink + (window - 1) + n
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, 4, n, 16, generator=g, requires_grad=grad)
    k = torch.randn(b, h_kv, kv_len, 16, generator=g, requires_grad=grad)
    v = torch.randn(b, h_kv, kv_len, 16, generator=g, requires_grad=grad)
    if layout == "evicted_with_sinks":
        k_pos = torch.cat([torch.arange(n_sink), torch.arange(tail_start, tail_start + kv_len - n_sink)])
    else:
        k_pos = torch.arange(kv_len)
    calls = []
    spied = (band_cpu, "band_attention") if path == "kernel" else (blocked_mod, "_interior_band")
    real = getattr(*spied)
    monkeypatch.setattr(*spied, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.set_grad_enabled(grad):
        fast = blocked_local_attention(q, k, v, q_start=q_start, n_sink=n_sink, tail_start=tail_start,
                                       window=window, sinks=sinks, scaling=0.3, block=block)
    # Under autograd the sink merge (log-sum-exp without gradient) is not used: sinks take the general path.
    assert bool(calls) == (not grad or sinks == 0)
    ref = reference_sliding_window_attention(q, k, v, window=window, sinks=sinks, scaling=0.3,
                                             q_positions=torch.arange(q_start, q_start + n), k_positions=k_pos)
    assert torch.allclose(fast, ref, atol=TOL), (fast - ref).abs().max()
    if grad:
        w = torch.randn(fast.shape, generator=g)
        g_fast = torch.autograd.grad((fast * w).sum(), (q, k, v))
        g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, r in zip(g_fast, g_ref):
            assert torch.allclose(a, r, atol=1e-4), (a - r).abs().max()


@pytest.mark.parametrize("path", ["kernel", "sdpa"])
def test_window_at_least_sequence_is_full_causal_attention(path, monkeypatch):
    _choose_band_path(path, monkeypatch)
    q, k, v = _qkv(n=40)
    fast = blocked_local_attention(q, k, v, q_start=0, n_sink=0, tail_start=0, window=40, block=16)
    full = reference_attention(q, k, v, None, is_causal=True)
    assert torch.allclose(fast, full, atol=TOL)


@pytest.mark.parametrize("sinks", [0, 2])
def test_bounded_cache_layer_decode_matches_reference(sinks):
    """Token-by-token through KVWindowLayer: keys kept = sinks + window - 1, outputs = dense reference."""
    window, n = 6, 30
    q, k, v = _qkv(n=n)
    layer = KVWindowLayer(window=window, sinks=sinks)
    for t in range(n):
        kk, vv = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        valid = layer.commit_validity(torch.ones(2, 1, dtype=torch.bool))
        pos = layer.last_positions
        out = reference_sliding_window_attention(q[:, :, t : t + 1], kk, vv, window=window, sinks=sinks,
                                                 key_valid=valid, q_positions=torch.tensor([t]), k_positions=pos)
        full = reference_sliding_window_attention(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
                                                  window=window, sinks=sinks)[:, -1:]
        assert torch.allclose(out, full, atol=TOL)
        assert layer.keys.shape[2] <= window + sinks - 1
    assert layer.positions.tolist() == list(range(sinks)) + list(range(n - window + 1, n))


# ------------------------------------------------------------------ linear


def _fmap(name, h=4, h_kv=2, d=16):
    return FeatureMap(name, h, h_kv, d, num_features=d, seed=3)


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_feature_maps_match_reference(name):
    fm = _fmap(name)
    q, k, _ = _qkv()
    for kind, x in (("q", q), ("k", k)):
        ref = reference_feature_map(name, x, **fm.reference_params(kind))
        assert torch.allclose(fm(x, kind), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FEATURE_MAPS)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_linear_attention_matches_reference_with_gradients(name, chunk):
    fm = _fmap(name)
    q, k, v = _qkv(n=37)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    valid = _left_pad_valid(2, 37)
    fq, fk = fm(q, "q"), fm(k, "k") * valid[:, None, :, None]
    fast, _, _ = chunked_linear_attention(fq, fk, v, chunk_size=chunk)
    ref = reference_linear_attention(fq, fk, v, key_valid=valid)
    rows = valid
    assert torch.allclose(fast[rows], ref[rows], rtol=1e-4, atol=1e-5)
    w = torch.randn_like(fast) * rows[..., None, None]
    g_fast = torch.autograd.grad((fast * w).sum(), (q, k, v) + tuple(fm.parameters()), allow_unused=True,
                                 retain_graph=True)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v) + tuple(fm.parameters()), allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_linear_state_handoff_is_exact():
    """Prefill 20 tokens, then continue 1 token at a time from the state: same as one pass."""
    fm = _fmap("elu")
    q, k, v = _qkv(n=30)
    fq, fk = fm(q, "q"), fm(k, "k")
    full, _, _ = chunked_linear_attention(fq, fk, v, chunk_size=8)
    out, s, z = chunked_linear_attention(fq[:, :, :20], fk[:, :, :20], v[:, :, :20], chunk_size=8)
    outs = [out]
    for t in range(20, 30):
        o, s, z = chunked_linear_attention(fq[:, :, t : t + 1], fk[:, :, t : t + 1], v[:, :, t : t + 1], s, z)
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), full, atol=TOL)
    assert s.shape == (2, 2, 16, 16) and z.shape == (2, 2, 16)  # per KV head, not per query head


def test_linear_state_layer_is_constant_memory():
    layer = LinearStateLayer()
    k = torch.randn(1, 2, 1, 8)
    for _ in range(50):
        layer.update(k, k)
    layer.state_s, layer.state_z = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)
    assert layer.get_seq_length() == 50 and layer.keys.shape[2] == 0
    assert layer.nbytes() == (2 * 8 * 8 + 2 * 8) * 4


# ------------------------------------------------------------------ sparse


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "window,global_tokens,random_blocks,block_size,padded",
    [(8, 0, 0, 8, False), (5, 3, 2, 4, True), (16, 9, 1, 8, True), (1, 0, 3, 5, False)],
    ids=lambda v: str(v),
)
def test_block_sparse_matches_mask_reference(causal, window, global_tokens, random_blocks, block_size, padded):
    cfg = SparseConfig(window=window, global_tokens=global_tokens, random_blocks=random_blocks,
                       block_size=block_size, seed=5)
    q, k, v = _qkv(n=45)
    valid = _left_pad_valid(2, 45) if padded else None
    fast = block_sparse_attention(q, k, v, cfg, causal=causal, key_valid=valid, scaling=None)
    ref = reference_sparse_attention(q, k, v, window=window, global_tokens=global_tokens,
                                     random_blocks=random_blocks, block_size=block_size, seed=5, causal=causal,
                                     key_valid=valid)
    rows = valid if valid is not None else torch.ones(2, 45, dtype=torch.bool)
    assert torch.allclose(fast[rows], ref[rows], atol=TOL), (fast - ref)[rows].abs().max()
