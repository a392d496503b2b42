"""The C band-attention kernel (variants/band_cpu.c) held to the dense reference, and its build/fallback rules."""

from __future__ import annotations

import pytest
import torch

from hf_attn_swap.reference import reference_sliding_window_attention
from hf_attn_swap.variants import band_cpu

TOL = 2e-5

# Where the CPU cannot run the kernel (not x86-64, no AVX2/FMA) or there is no C compiler, these tests have nothing
# to test: callers take the SDPA path there, which test_variants_* cover. The reason is printed with -rs.
_CANNOT = band_cpu.unavailable_reason()
pytestmark = pytest.mark.skipif(_CANNOT is not None, reason=f"band kernel cannot run here: {_CANNOT}")


def _reference(q, k, v, window, q_offset, scale):
    m = q.shape[2]
    return reference_sliding_window_attention(
        q, k, v, window=window, scaling=scale, q_positions=torch.arange(q_offset, q_offset + m),
        k_positions=torch.arange(k.shape[2]),
    ).transpose(1, 2)  # (b, H, m, d) like the kernel's output


@pytest.fixture(scope="module", autouse=True)
def _kernel_built():
    # This CPU can run it and a compiler is there: the kernel must build, not quietly fall back.
    assert band_cpu.available(), "band_cpu.c did not build or cannot run here"


@pytest.mark.parametrize(
    "b,h,h_kv,m,n,d,window,q_offset",
    [
        (1, 4, 4, 300, 300, 64, 32, 0),     # fresh prefill, several blocks, a partial last block
        (2, 6, 2, 130, 200, 32, 50, 70),    # a chunk after 70 cached tokens, GQA 3
        (1, 2, 1, 1, 100, 128, 16, 99),     # one decode step, MQA, d=128
        (1, 2, 2, 77, 77, 64, 500, 0),      # window longer than the sequence: plain causal
        (1, 3, 3, 129, 129, 16, 1, 0),      # window 1: each query sees only itself
        (2, 2, 2, 64, 64, 16, 64, 0),       # exactly one block, window = block
        (1, 9, 3, 700, 700, 64, 512, 0),    # SmolLM2's head shape, real window size
    ],
    ids=str,
)
def test_kernel_matches_reference(b, h, h_kv, m, n, d, window, q_offset):
    g = torch.Generator().manual_seed(m + n + d)
    q, k, v = (torch.randn(b, hh, s, d, generator=g) for hh, s in ((h, m), (h_kv, n), (h_kv, n)))
    scale = 0.7 / d**0.5
    out, lse = band_cpu.band_attention(q, k, v, q_offset=q_offset, window=window, scale=scale, want_lse=True)
    ref = _reference(q, k, v, window, q_offset, scale)
    assert torch.allclose(out, ref, atol=TOL), (out - ref).abs().max()
    # log-sum-exp of each query's visible scores (what the sink merge weighs by)
    s = torch.matmul(q, k.repeat_interleave(h // h_kv, 1).transpose(-1, -2)) * scale
    qp = torch.arange(q_offset, q_offset + m)[:, None]
    kp = torch.arange(n)[None]
    s = s.masked_fill(~((kp <= qp) & (kp > qp - window)), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)


@pytest.mark.parametrize("layout", ["sinks_in_keys", "sinks_kept_apart"])
@pytest.mark.parametrize("n_sinks", [1, 4, 7])
def test_kernel_sinks_match_reference(layout, n_sinks):
    """Sinks stay visible once the window has left them: as the first keys themselves (fresh prefill), or kept apart
    from a tail that starts later (an evicting cache)."""
    g = torch.Generator().manual_seed(n_sinks)
    b, h, h_kv, m, d, window = 2, 4, 2, 150, 32, 24
    q = torch.randn(b, h, m, d, generator=g)
    if layout == "sinks_in_keys":
        k, v = torch.randn(b, h_kv, m, d, generator=g), torch.randn(b, h_kv, m, d, generator=g)
        sk, sv, key_start, q_offset = k[:, :, :n_sinks], v[:, :, :n_sinks], 0, 0
        k_all, v_all, k_pos = k, v, torch.arange(m)
    else:  # tail = the last window - 1 cached tokens, then the chunk; it starts at position 500
        n = window - 1 + m
        k, v = torch.randn(b, h_kv, n, d, generator=g), torch.randn(b, h_kv, n, d, generator=g)
        sk, sv = torch.randn(b, h_kv, n_sinks, d, generator=g), torch.randn(b, h_kv, n_sinks, d, generator=g)
        key_start, q_offset = 500, window - 1
        k_all, v_all = torch.cat([sk, k], 2), torch.cat([sv, v], 2)
        k_pos = torch.cat([torch.arange(n_sinks), torch.arange(500, 500 + n)])
    out, lse = band_cpu.band_attention(q, k, v, q_offset=q_offset, window=window, scale=0.3, sink_key=sk,
                                       sink_value=sv, key_start=key_start, want_lse=True)
    q_pos = torch.arange(key_start + q_offset, key_start + q_offset + m)
    ref = reference_sliding_window_attention(q, k_all, v_all, window=window, sinks=n_sinks, scaling=0.3,
                                             q_positions=q_pos, k_positions=k_pos).transpose(1, 2)
    assert torch.allclose(out, ref, atol=TOL), (out - ref).abs().max()
    assert torch.isfinite(lse).all()


def test_kernel_reads_strided_views_and_writes_into_a_view():
    """Queries as transformers hands them over ((b, q, H, d) transposed), output into a slice of a bigger tensor."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 90, 4, 32, generator=g).transpose(1, 2)
    k = torch.randn(2, 90, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(2, 90, 2, 32, generator=g).transpose(1, 2)
    big = torch.full((2, 4, 100, 32), 7.0)
    band_cpu.band_attention(q[:, :, 10:], k, v, q_offset=10, window=20, scale=0.2, out=big[:, :, 10:90])
    ref = _reference(q[:, :, 10:], k, v, 20, 10, 0.2)
    assert torch.allclose(big[:, :, 10:90], ref, atol=TOL)
    assert bool((big[:, :, :10] == 7).all() and (big[:, :, 90:] == 7).all())  # nothing written outside


def test_kernel_is_causal_and_local_exactly():
    """A future key, or a key that left the window, changes no output bit."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 200, 64, generator=g) for _ in range(3))
    out, _ = band_cpu.band_attention(q, k, v, q_offset=0, window=40, scale=0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 150], v2[:, :, 150] = 100.0, -100.0
    out2, _ = band_cpu.band_attention(q, k2, v2, q_offset=0, window=40, scale=0.125)
    assert torch.equal(out[:, :, :150], out2[:, :, :150])  # before the change
    assert torch.equal(out[:, :, 190:], out2[:, :, 190:])  # key 150 has left their window
    assert not torch.allclose(out[:, :, 150:190], out2[:, :, 150:190])


def test_usable_only_where_the_kernel_applies():
    q = torch.randn(1, 2, 8, 64)
    assert band_cpu.usable(q, q, q)
    assert not band_cpu.usable(q.double(), q.double(), q.double())  # fp32 only
    assert not band_cpu.usable(q[..., :24], q[..., :24], q[..., :24])  # head dim not a multiple of 16
    assert not band_cpu.usable(q[..., ::2], q[..., ::2], q[..., ::2])  # last dim strided
    qg = q.clone().requires_grad_()
    assert not band_cpu.usable(qg, q, q)  # no backward
    with torch.no_grad():
        assert band_cpu.usable(qg, q, q)
    with band_cpu.off():
        assert not band_cpu.usable(q, q, q)
    assert band_cpu.usable(q, q, q)


def test_bad_layout_is_a_clear_error():
    q = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="q_offset"):
        band_cpu.band_attention(q, q, q, q_offset=5, window=4, scale=1.0)  # queries run past the keys
    with pytest.raises(ValueError, match="float32"):
        band_cpu.band_attention(q.double(), q.double(), q.double(), q_offset=0, window=4, scale=1.0)
    with pytest.raises(ValueError, match="float32"):  # value shaped unlike key
        band_cpu.band_attention(q, q, q[:, :, :5], q_offset=0, window=4, scale=1.0)
    with pytest.raises(ValueError, match="key_start"):  # sinks overlapping a tail that starts after 0
        band_cpu.band_attention(q, q, q, q_offset=0, window=4, scale=1.0, sink_key=q[:, :, :3],
                                sink_value=q[:, :, :3], key_start=2)
    with pytest.raises(ValueError, match="heads"):
        band_cpu.band_attention(q, torch.randn(1, 3, 10, 16), torch.randn(1, 3, 10, 16), q_offset=0, window=4,
                                scale=1.0)


def test_build_is_cached_and_reports_compiler_failures(tmp_path, monkeypatch):
    lib = band_cpu.build(tmp_path)
    assert lib.exists() and lib.parent == tmp_path
    stamp = lib.stat().st_mtime_ns
    assert band_cpu.build(tmp_path) == lib and lib.stat().st_mtime_ns == stamp  # a cache hit, not a rebuild
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(band_cpu.KernelBuildError, match="no C compiler"):
        band_cpu.build(tmp_path / "other")


def test_switched_off_by_environment(monkeypatch):
    band_cpu._library.cache_clear()
    monkeypatch.setenv(band_cpu.ENV, "0")
    try:
        assert not band_cpu.available()
        q = torch.randn(1, 2, 8, 64)
        assert not band_cpu.usable(q, q, q)
    finally:
        monkeypatch.delenv(band_cpu.ENV)
        band_cpu._library.cache_clear()
    assert band_cpu.available()


def test_threads_split_the_work_without_changing_a_bit():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 333, 32, generator=g) for _ in range(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = band_cpu.band_attention(q, k, v, q_offset=0, window=70, scale=0.2)
        torch.set_num_threads(2)
        two, _ = band_cpu.band_attention(q, k, v, q_offset=0, window=70, scale=0.2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_hybrid_window_part_takes_the_kernel_in_inference(monkeypatch):
    """The hybrid's softmax-window part (output and log-sum-exp) is the same through the kernel as through its
    explicit, differentiable scores."""
    from hf_attn_swap.variants.hybrid import band_softmax_lse

    calls = []
    real = band_cpu.band_attention
    monkeypatch.setattr(band_cpu, "band_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 100, 32, generator=g)
    k, v = torch.randn(2, 2, 130, 32, generator=g), torch.randn(2, 2, 130, 32, generator=g)
    args = dict(q_start=530, k_start=500, window=24, key_valid=None, scaling=0.2)
    with torch.no_grad():
        o_k, lse_k = band_softmax_lse(q, k, v, **args)
        with band_cpu.off():
            o_e, lse_e = band_softmax_lse(q, k, v, **args)
    assert calls == [1]  # the first call took the kernel, the one inside off() did not
    assert torch.allclose(o_k, o_e, atol=TOL) and torch.allclose(lse_k, lse_e, atol=1e-5)


def test_skip_marker_follows_the_cpu(monkeypatch):
    """The module's skip condition is the same check the library uses to decide whether to build at all."""
    monkeypatch.setattr(band_cpu, "_cpu_flags", lambda: {"sse4_2", "avx"})
    reason = band_cpu.unavailable_reason()
    assert reason is not None and "AVX2" in reason
    band_cpu._library.cache_clear()
    try:
        assert not band_cpu.available()  # no build attempted on a CPU that cannot run it
    finally:
        band_cpu._library.cache_clear()
