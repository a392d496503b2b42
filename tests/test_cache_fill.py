"""Caches filled directly to a length: the same decode as after a real prefill, the same shapes with random K/V, the
static cache, the memory check before timing, and the step profile."""

from __future__ import annotations

import pytest
import torch

from hf_attn_swap import swap_attention
from hf_attn_swap.eval import speed
from hf_attn_swap.eval.cache_fill import fill_cache, new_cache, record_prefill_kv
from hf_attn_swap.eval.memory import analytic_kv_bytes
from hf_attn_swap.eval.step_profile import profile_decode_step, profile_step
from hf_attn_swap.hf_compat import cache_kwarg

from tiny_models import tiny

VARIANTS = [
    ("baseline", {}),
    ("mqa", {}),
    ("gqa", {"groups": 2}),
    ("sliding_window", {"window": 8, "sinks": 2}),
    ("linear", {}),
    ("linear", {"window": 6}),  # the hybrid
    ("linear", {"feature_map": "hedgehog", "window": 6}),
]
IDS = [f"{n}{o}" for n, o in VARIANTS]


def model_of(name, opts):
    m = tiny("llama")
    if name != "baseline":
        swap_attention(m, name, **opts)
    return m


def tensors(cache):
    """Shape and dtype of every state tensor of every layer, by attribute name."""
    out = []
    for layer in cache.layers:
        out.append({k: (tuple(t.shape), t.dtype) for k in ("keys", "values", "state_s", "state_z", "valid")
                    if isinstance(t := getattr(layer, k, None), torch.Tensor)})
    return out


def decode(model, cache, tokens):
    name = cache_kwarg(model)
    return torch.stack([model(input_ids=tokens[:, t : t + 1], **{name: cache}, use_cache=True).logits[:, -1]
                        for t in range(tokens.shape[1])])


@pytest.mark.parametrize("name, opts", VARIANTS, ids=IDS)
@torch.no_grad()
def test_filled_from_a_real_prefill_decodes_like_it(name, opts):
    model = model_of(name, opts)
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 20))  # longer than every window: evicted keys and folded states are exercised
    real = new_cache(model)
    with record_prefill_kv(model) as kv:
        model(input_ids=ids, **{cache_kwarg(model): real}, use_cache=True)
    assert len(kv) == 2 and kv[0][0].shape[2] == 20
    filled = fill_cache(model, 20, 2, kv=kv)
    assert [type(x) for x in filled.layers] == [type(x) for x in real.layers]
    assert tensors(filled) == tensors(real)
    nxt = torch.randint(3, 100, (2, 6))
    a, b = decode(model, real, nxt), decode(model, filled, nxt)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert filled.get_seq_length() == real.get_seq_length() == 26


@pytest.mark.parametrize("name, opts", VARIANTS, ids=IDS)
@torch.no_grad()
def test_random_fill_has_the_real_caches_shapes(name, opts):
    model = model_of(name, opts)
    real = new_cache(model)
    model(input_ids=torch.randint(3, 100, (3, 40)), **{cache_kwarg(model): real}, use_cache=True)
    filled = fill_cache(model, 40, 3, seed=5)
    assert tensors(filled) == tensors(real)
    assert filled.get_seq_length() == 40
    again = fill_cache(model, 40, 3, seed=5)
    nxt = torch.randint(3, 100, (3, 2))
    torch.testing.assert_close(decode(model, filled, nxt), decode(model, again, nxt))  # seeded: reproducible
    assert torch.isfinite(decode(model, fill_cache(model, 40, 3, seed=6), nxt)).all()


@pytest.mark.parametrize("name, opts", [("baseline", {}), ("mqa", {})])
@torch.no_grad()
def test_static_cache_filled_from_a_prefill_decodes_like_the_dynamic_one(name, opts):
    model = model_of(name, opts)
    ids = torch.randint(3, 100, (2, 12))
    real = new_cache(model)
    with record_prefill_kv(model) as kv:
        model(input_ids=ids, **{cache_kwarg(model): real}, use_cache=True)
    static = fill_cache(model, 12, 2, kv=kv, static_len=20)
    assert type(static).__name__ == "StaticCache" and int(static.get_seq_length()) == 12
    nxt = torch.randint(3, 100, (2, 4))
    torch.testing.assert_close(decode(model, static, nxt), decode(model, real, nxt), rtol=1e-5, atol=1e-5)


def test_bad_fill_requests_get_one_clear_line():
    sw = model_of("sliding_window", {"window": 8})
    before = {k: v.clone() for k, v in sw.state_dict().items()}
    with pytest.raises(ValueError, match="sliding_window keep their own cache layer.*allowed with static: baseline"):
        fill_cache(sw, 16, 1, static_len=32)
    assert all(torch.equal(before[k], v) for k, v in sw.state_dict().items())
    base = tiny("llama")
    with pytest.raises(ValueError, match="need context >= 1"):
        fill_cache(base, 0, 1)
    with pytest.raises(ValueError, match="leaves no room to decode"):
        fill_cache(base, 16, 1, static_len=16)
    bad = [(torch.zeros(1, 4, 5, 8), torch.zeros(1, 4, 5, 8))] * 2
    with pytest.raises(ValueError, match=r"layer 0 have shape \(1, 4, 5, 8\), expected \(1, 4, 6, 8\)"):
        fill_cache(base, 6, 1, kv=bad)


def test_decode_timing_on_filled_caches():
    base, mqa = tiny("llama"), model_of("mqa", {})
    with speed.num_threads(1):
        res, errors = speed.compare_speed({"base": base, "mqa": mqa}, decode_contexts=[48], decode_batch_sizes=[2],
                                          steps=2, decode_warmup=1, fill="random")
        assert not errors
        for name, m in (("base", base), ("mqa", mqa)):
            cell = res[name]["decode"][0]
            assert cell["fill"] == "random" and cell["cache"] == "dynamic" and cell["median_ms"] > 0
            assert cell["kv_bytes_kv_only"] == analytic_kv_bytes(m, 48, batch=2)[0]  # the cache the steps started from
        static = speed.decode_throughput(base, [48], [2], steps=2, warmup=1, fill="random", cache="static")
        assert static[0]["cache"] == "static" and static[0]["median_ms"] > 0
        sw = model_of("sliding_window", {"window": 8})
        with pytest.raises(RuntimeError, match="keep their own cache layer"):
            speed.decode_throughput(sw, [48], fill="random", cache="static")
    with pytest.raises(ValueError, match="cache='static' needs fill='random'"):
        speed.compare_speed({"base": base}, decode_contexts=[8], cache="static")


def test_a_cell_that_does_not_fit_is_refused_before_anything_is_allocated(monkeypatch):
    base = tiny("llama")
    with pytest.raises(ValueError, match=r"context 4096 x batch 8 does not fit: .* need 0\.\d+ GB \(\+10%\) and "
                                         r"0\.00 GB is available"):
        speed.check_cache_fits({"base": base}, [64, 4096], [1, 8], available=1000)
    calls = []
    monkeypatch.setattr(speed, "_filled", lambda *a: calls.append(a))
    monkeypatch.setattr(speed, "available_memory", lambda device: 10_000)
    with pytest.raises(ValueError, match="does not fit"):
        speed.compare_speed({"base": base}, decode_contexts=[4096], fill="random")
    assert calls == []  # refused before any cache was filled
    speed.check_cache_fits({"base": base}, [64], [1], available=10**9)  # what fits passes


@torch.no_grad()
def test_step_profile_sorts_time_into_arithmetic_copies_and_python():
    x, w = torch.randn(256, 256), torch.randn(256, 256)
    prof = profile_step(lambda: torch.cat([x] * 64), steps=2)
    assert prof["cache_copy"] > prof["matmul"] and prof["cache_copy"] > 0.5 * (prof["wall"] - prof["python"])
    prof = profile_step(lambda: x @ w, steps=2)
    assert prof["matmul"] > prof["cache_copy"]
    model = tiny("llama")
    dyn = profile_decode_step(model, 256, 2, steps=2)
    stat = profile_decode_step(model, 256, 2, steps=2, static=True)
    assert set(dyn) == {"matmul", "attention", "cache_copy", "kv_copy", "other_ops", "python", "wall"}
    for p in (dyn, stat):
        assert sum(p[k] for k in p if k != "wall") == pytest.approx(p["wall"], rel=0.02) or p["python"] == 0


@torch.no_grad()
def test_compiled_step_profile_finds_the_frozen_matmuls_and_the_decode_operator():
    """The compiled step speed_at_scale --compile times, profiled: freezing's prepacked GEMMs count as matmul and the
    decode operator (where the kernel runs here) as attention, not as the compiled graph's other work."""
    from hf_attn_swap.variants import band_cpu

    model = swap_attention(tiny("llama"), "mqa")
    with pytest.raises(ValueError, match="needs static"):
        profile_decode_step(model, 64, 2, compile=True)
    prof = profile_decode_step(model, 256, 2, steps=2, static=True, compile=True)
    assert prof["matmul"] > 0
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    if band_cpu.decode_available(head_dim):
        assert prof["attention"] > 0
    assert sum(prof[k] for k in prof if k != "wall") == pytest.approx(prof["wall"], rel=0.02) or prof["python"] == 0


@pytest.mark.parametrize("name, opts", [("sliding_window", {"window": 4}), ("linear", {"window": 3}),
                                        ("sparse", {})], ids=["window", "hybrid", "sparse"])
@torch.no_grad()
def test_decode_appending_into_a_buffer_matches_the_full_forward(name, opts):
    """Window layers append decode tokens into a preallocated buffer, refilled when full (every ~64 steps here): 90
    steps cross several refills, then a batch repeat drops the buffer; every step's logits equal the full forward's."""
    if name == "sparse":
        opts = {"window": 6, "global_tokens": 2, "block_size": 4}  # keeps every key (window=None layer): doubling
    model = model_of(name, opts)
    ids = torch.randint(3, 100, (1, 100), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids).logits
    cache = new_cache(model)
    name_kw = cache_kwarg(model)
    model(input_ids=ids[:, :10], **{name_kw: cache}, use_cache=True)
    for t in range(10, 80):
        got = model(input_ids=ids[:, t : t + 1], **{name_kw: cache}, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, full[:, t], rtol=1e-4, atol=1e-4)
    cache.batch_repeat_interleave(2)
    for t in range(80, 100):
        got = model(input_ids=ids[:, t : t + 1].expand(2, 1), **{name_kw: cache}, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, full[:, t].expand(2, -1), rtol=1e-4, atol=1e-4)
