"""The C decode-attention kernel (variants/band_cpu.c: decode_attention_f32) held to the dense reference, and the
rules by which GQA/MQA decode steps take it or SDPA."""

from __future__ import annotations

import contextlib

import pytest
import torch

from hf_attn_swap.reference import reference_attention
from hf_attn_swap.variants import band_cpu, decode_op
from hf_attn_swap.variants.gqa import grouped_attention

TOL = 2e-5

# Where the CPU cannot run it (not x86-64, no AVX2/FMA, no compiler) decode steps take SDPA, which test_variants_*
# hold to the reference; the reason is printed with -rs. The AVX-512 version is tested where the CPU has AVX-512F,
# the AVX2 version everywhere the kernel runs.
_CANNOT = band_cpu.decode_unavailable_reason()
pytestmark = pytest.mark.skipif(_CANNOT is not None, reason=f"decode kernel cannot run here: {_CANNOT}")


class _Module(torch.nn.Module):
    is_causal = True


def _reference(q, k, v, valid, scale):
    """(b, 1, H, d) like the kernel; valid: bool (b or 1, n) or None."""
    mask = None if valid is None else valid[:, None, None, :].expand(q.shape[0], 1, 1, k.shape[2])
    return reference_attention(q, k, v, mask, scaling=scale, is_causal=False)


ISAS = ["avx2"] + (["avx512"] if band_cpu.decode_available(64, "avx512") else [])


@pytest.fixture(scope="module", autouse=True)
def _kernel_runs():
    # This CPU can run it and a compiler is there: the kernel must build, not quietly fall back.
    assert band_cpu.decode_available(64), "band_cpu.c did not build, or its decode kernel does not run here"


@pytest.mark.parametrize(
    "b,h,h_kv,n,d",
    [
        (1, 9, 3, 1, 64),       # a single cached key
        (2, 9, 1, 700, 64),     # SmolLM2 MQA: 9 query heads on one KV head, a partial last block
        (3, 9, 3, 256, 64),     # SmolLM2 GQA-3, exactly two blocks
        (2, 4, 4, 129, 128),    # MHA, d=128 (Llama), one key past a block
        (1, 16, 1, 77, 64),     # the largest group a block holds
        (2, 12, 2, 33, 192),    # three 64-dim tiles, keys not a multiple of 16
        (2, 8, 2, 70, 96),      # d=96: AVX2 only (not a multiple of 64)
    ],
    ids=str,
)
@pytest.mark.parametrize("masking", ["none", "per_sequence", "shared"])
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_matches_reference(b, h, h_kv, n, d, masking, isa):
    if not band_cpu.decode_available(d, isa):
        with pytest.raises(RuntimeError, match="does not run here for head dim"):
            band_cpu.decode_attention(torch.randn(b, h, 1, d), torch.randn(b, h_kv, n, d), torch.randn(b, h_kv, n, d),
                                      scale=1.0, isa=isa)
        return
    g = torch.Generator().manual_seed(n + d + h)
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = (torch.randn(b, h_kv, n, d, generator=g) * 2 for _ in range(2))
    valid = None
    if masking != "none":
        valid = torch.rand(b if masking == "per_sequence" else 1, n, generator=g) > 0.4
        valid[:, -1] = True
    scale = 0.8 / d**0.5
    out = band_cpu.decode_attention(q, k, v, scale=scale, key_valid=valid, isa=isa)
    ref = _reference(q, k, v, valid, scale)
    assert out.shape == (b, 1, h, d)
    assert torch.allclose(out, ref, atol=TOL), (out - ref).abs().max()


@pytest.mark.parametrize("isa", ISAS)
def test_every_group_size(isa):
    """G = 1..16 query heads per KV head: P @ V splits the heads as evenly as tiles of at most 6 (AVX-512: 9 -> 5 + 4)
    or 3 heads (AVX2: 16 -> 3 + 3 + 3 + 3 + 2 + 2) allow; every split held to the reference."""
    g = torch.Generator().manual_seed(7)
    for group in range(1, 17):
        q = torch.randn(2, 2 * group, 1, 64, generator=g)
        k, v = (torch.randn(2, 2, 150, 64, generator=g) for _ in range(2))
        out = band_cpu.decode_attention(q, k, v, scale=0.125, isa=isa)
        assert torch.allclose(out, _reference(q, k, v, None, 0.125), atol=TOL), group


@pytest.mark.parametrize("isa", ISAS)
def test_left_padding_hides_whole_blocks(isa):
    """A sequence whose first 300 keys are padding: the online softmax starts from blocks that see nothing."""
    g = torch.Generator().manual_seed(1)
    q, (k, v) = torch.randn(2, 9, 1, 64, generator=g), (torch.randn(2, 1, 1000, 64, generator=g) for _ in range(2))
    valid = torch.ones(2, 1000, dtype=torch.bool)
    valid[0, :300] = False
    valid[1, 500:] = False  # and one whose last blocks are hidden
    out = band_cpu.decode_attention(q, k, v, scale=0.125, key_valid=valid, isa=isa)
    assert torch.allclose(out, _reference(q, k, v, valid, 0.125), atol=TOL)


@pytest.mark.parametrize("isa", ISAS)
def test_reads_a_static_cache_in_place(isa):
    """K/V as a static cache holds them: views of a longer buffer (strided over batch and head), never copied."""
    g = torch.Generator().manual_seed(2)
    buf_k, buf_v = (torch.randn(3, 2, 4, 600, 64, generator=g) for _ in range(2))
    k, v = buf_k[:, 1, :3, :450], buf_v[:, 0, 1:, :450]
    assert not k.is_contiguous() and not v.is_contiguous()
    q = torch.randn(3, 12, 64, generator=g)[:, :, None]  # (b, H, 1, d) view
    out = band_cpu.decode_attention(q, k, v, scale=0.125, isa=isa)
    assert torch.allclose(out, _reference(q, k.contiguous(), v.contiguous(), None, 0.125), atol=TOL)


@pytest.mark.parametrize("isa", ISAS)
def test_threads_split_the_work_without_changing_a_bit(isa):
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, 6, 1, 64, generator=g), torch.randn(4, 2, 500, 64, generator=g), torch.randn(4, 2, 500, 64, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = band_cpu.decode_attention(q, k, v, scale=0.125, isa=isa)
        torch.set_num_threads(2)
        two = band_cpu.decode_attention(q, k, v, scale=0.125, isa=isa)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bad_layout_is_a_clear_error():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 10, 64)
    with pytest.raises(ValueError, match="d a multiple of 32"):
        band_cpu.decode_attention(q[..., :16], k[..., :16], k[..., :16], scale=1.0)
    with pytest.raises(ValueError, match="isa must be one of"):
        band_cpu.decode_attention(q, k, k, scale=1.0, isa="sse")
    with pytest.raises(ValueError, match=r"query \(b, H, 1, d\)"):
        band_cpu.decode_attention(torch.randn(1, 4, 2, 64), k, k, scale=1.0)  # two queries: not a decode step
    with pytest.raises(ValueError, match="H / H_kv <= 16"):
        band_cpu.decode_attention(torch.randn(1, 17, 1, 64), k[:, :1], k[:, :1], scale=1.0)
    with pytest.raises(ValueError, match="key_valid must be bool"):
        band_cpu.decode_attention(q, k, k, scale=1.0, key_valid=torch.ones(1, 9, dtype=torch.bool))


def _decode_step(dtype, mask=None, b=2, h=9, h_kv=1, n=300):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(b, h, 1, 64, generator=g).to(dtype)
    k, v = (torch.randn(b, h_kv, n, 64, generator=g).to(dtype) for _ in range(2))
    return q, k, v, mask


@pytest.mark.parametrize(
    "case,takes_kernel",
    [("fp32", True), ("bool_mask", True), ("bf16", False), ("grad", False), ("per_head_mask", False),
     ("sequence_sees_nothing", True), ("switched_off", False), ("two_queries", False)],
)
def test_grouped_attention_takes_the_kernel_only_where_it_applies(monkeypatch, case, takes_kernel):
    """GQA/MQA decode steps go through the kernel in fp32 inference and through SDPA otherwise (bf16, autograd,
    masks the kernel cannot express, band_cpu.off()); both match the reference. A sequence with no visible key gets
    zeros from the kernel, as from SDPA."""
    calls = []
    real = band_cpu.decode_attention_unchecked
    monkeypatch.setattr(band_cpu, "decode_attention_unchecked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    q, k, v, _ = _decode_step(dtype)
    mask = None
    if case in ("bool_mask", "sequence_sees_nothing"):
        mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)
        mask[0, ..., :120] = False
        if case == "sequence_sees_nothing":
            mask[1] = False
    if case == "per_head_mask":
        mask = torch.rand(2, 1, 9, 300, generator=torch.Generator().manual_seed(5)).reshape(2, 9, 1, 300) > 0.3
    if case == "two_queries":
        q = torch.cat([q, q], dim=2)
        mask = torch.ones(2, 1, 2, 300, dtype=torch.bool)
    if case == "grad":
        q.requires_grad_()
    with torch.no_grad() if case != "grad" else torch.enable_grad(), \
            band_cpu.off() if case == "switched_off" else contextlib.nullcontext():
        out, _ = grouped_attention(_Module(), q, k, v, mask, scaling=0.125)
    assert bool(calls) == takes_kernel
    ref = reference_attention(q.float(), k.float(), v.float(), mask, scaling=0.125, is_causal=True)
    if case == "sequence_sees_nothing":
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        with torch.no_grad(), band_cpu.off():
            sdpa, _ = grouped_attention(_Module(), q, k, v, mask, scaling=0.125)
        assert torch.equal(sdpa[1], out[1])  # what SDPA gives it too (torch >= 2.5)
        out, ref = out[:1], ref[:1]
    tol = 2e-2 if dtype == torch.bfloat16 else TOL
    assert torch.allclose(out.float(), ref, atol=tol), (out.float() - ref).abs().max()


def test_real_model_decodes_the_same_through_the_kernel():
    """SmolLM2 converted to MQA, greedy decoding with left padding through a dynamic and a static cache: the same
    tokens and the same logits (to fp32 rounding over 30 layers) with the kernel as with SDPA."""
    from hf_attn_swap import swap_attention
    from hf_attn_swap.zoo import load_model

    model, tok = load_model("smollm2-135m")
    swap_attention(model, "mqa", strategy="mean")
    ids = tok(["The king said that the", "Once upon a time, in a land far"], return_tensors="pt", padding=True)
    assert not bool(ids["attention_mask"].all())  # the shorter prompt is padded
    calls = []
    real = band_cpu.decode_attention_unchecked
    try:
        band_cpu.decode_attention_unchecked = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        with torch.no_grad():
            for cache in ("dynamic", "static"):
                kw = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache, output_scores=True,
                          return_dict_in_generate=True)
                calls.clear()
                fast = model.generate(**ids, **kw)
                assert len(calls) == 30 * 7  # every layer of every step after the prefill
                with band_cpu.off():
                    slow = model.generate(**ids, **kw)
                assert torch.equal(fast.sequences, slow.sequences), cache
                for a, b in zip(fast.scores, slow.scores):
                    assert torch.allclose(a, b, atol=5e-3, rtol=0), (cache, (a - b).abs().max())
    finally:
        band_cpu.decode_attention_unchecked = real


def test_step_profile_counts_the_kernel_as_attention():
    """A ctypes call is no torch operator: the kernel names itself for the profiler, so decode steps' time in it is
    attention, not Python, in the speed report's breakdown."""
    from hf_attn_swap.eval.step_profile import profile_step

    # 32k keys (16 MB of K, read twice): ~3 ms of kernel against ~0.1-0.4 ms of Python checks and profiler overhead.
    # At 2k keys the kernel took ~0.13 ms a call and a busy CI core (two legs beside each other) tipped the split.
    q, k = torch.randn(2, 9, 1, 64), torch.randn(2, 1, 32768, 64)
    split = profile_step(lambda: band_cpu.decode_attention(q, k, k, scale=0.125), steps=2)
    assert split["attention"] > 0.5 * split["wall"], split


# --- the kernel as a torch operator (variants/decode_op.py), and compiled decode steps through it -------------------

_OP = torch.ops.hf_attn_swap.decode_attention.default  # registered by importing decode_op
assert decode_op.OP_NAME == "hf_attn_swap::decode_attention" == band_cpu.PROFILE_NAME  # the name step_profile counts


@pytest.fixture
def fresh_dynamo():
    """Compiled tests start and end with dynamo's caches empty (their functions share code objects, and the
    recompile limit would otherwise be reached across parameters)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the kernel's entries: "op" (band_cpu.decode_attention, which only the operator calls on the decode
    path) and "kernel" (decode_attention_unchecked, which every route into the C kernel ends in)."""
    calls = {"op": 0, "kernel": 0}
    checked, unchecked = band_cpu.decode_attention, band_cpu.decode_attention_unchecked

    def count(name, fn):
        def counted(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return counted

    monkeypatch.setattr(band_cpu, "decode_attention", count("op", checked))
    monkeypatch.setattr(band_cpu, "decode_attention_unchecked", count("kernel", unchecked))
    return calls


@pytest.mark.parametrize("masking", ["none", "per_sequence", "shared"])
def test_operator_matches_reference(masking):
    """torch.ops.hf_attn_swap.decode_attention gives the kernel's result bit for bit (the reference's to TOL), passes
    torch's own operator checks (schema, fake tensor vs real output, no autograd registered by mistake), and takes a
    K/V whose last dimension a compiled graph might hand over strided."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 9, 1, 64, generator=g)
    k = torch.randn(2, 1, 64, 90, generator=g).transpose(-1, -2)  # (2, 1, 90, 64), last dimension strided
    v = torch.randn(2, 1, 90, 64, generator=g)
    valid = None
    if masking != "none":
        valid = torch.rand(2 if masking == "per_sequence" else 1, 90, generator=g) > 0.4
        valid[:, -1] = True
    out = _OP(q, k, v, 0.125, valid)
    assert out.shape == (2, 1, 9, 64) and out.is_contiguous()
    assert torch.equal(out, band_cpu.decode_attention_unchecked(q, k.contiguous(), v, 0.125, valid))
    assert torch.allclose(out, _reference(q, k, v, valid, 0.125), atol=TOL)
    result = torch.library.opcheck(_OP, (q, k.contiguous(), v, 0.125, valid))
    assert set(result.values()) == {"SUCCESS"}, result


def test_operator_is_fp32_only():
    """The kernel computes in fp32 only: the operator refuses bf16 (grouped_attention never sends it there, see
    test_compiled_bf16_decode_step_takes_sdpa) rather than reading its bytes as floats."""
    q, k = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16), torch.randn(1, 2, 10, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CPU float32"):
        _OP(q, k, k, 0.125, None)


def _grouped(q, k, v, mask):
    return grouped_attention(_Module(), q, k, v, mask, scaling=0.125)[0]


def _padding_mask(b, n):
    """SDPA's bool (b, 1, 1, n) decode mask: the first sequence left-padded by a third of the cache."""
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[0, ..., : n // 3] = False
    return mask


@pytest.mark.parametrize("h,h_kv", [(8, 2), (9, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
def test_compiled_decode_step_takes_the_operator(fresh_dynamo, kernel_calls, h, h_kv, padded):
    """A one-token decode step through grouped_attention compiles into one graph (fullgraph=True raises on a break),
    the compiled graph calls the kernel through its operator once per call, and the result is the eager one, which
    calls the kernel directly."""
    q, k, v, _ = _decode_step(torch.float32, b=2, h=h, h_kv=h_kv, n=70)
    mask = _padding_mask(2, 70) if padded else None
    with torch.no_grad():
        eager = _grouped(q, k, v, mask)
        assert kernel_calls == {"op": 0, "kernel": 1}
        compiled = torch.compile(_grouped, fullgraph=True)
        compiled(q, k, v, mask)  # compiles (tracing runs the fake implementation), then runs the graph
        kernel_calls.update(op=0, kernel=0)
        out = compiled(q, k, v, mask)
    assert kernel_calls == {"op": 1, "kernel": 1}
    assert torch.equal(out, eager)
    assert torch.allclose(out, reference_attention(q, k, v, mask, scaling=0.125, is_causal=True), atol=TOL)


def test_compiled_decode_step_recompiles_for_off(fresh_dynamo, kernel_calls):
    """band_cpu.off() is guarded on, not baked into the graph: inside it the compiled step recompiles to SDPA."""
    q, k, v, _ = _decode_step(torch.float32, n=70)
    compiled = torch.compile(_grouped, fullgraph=True)
    with torch.no_grad():
        fast = compiled(q, k, v, None)
        assert kernel_calls["op"] == 1
        with band_cpu.off():
            slow = compiled(q, k, v, None)
    assert kernel_calls["op"] == 1
    assert torch.allclose(fast, slow, atol=TOL)


def test_compiled_bf16_decode_step_takes_sdpa(fresh_dynamo, kernel_calls):
    """bf16 is not the kernel's: the compiled step folds the group into SDPA, with a padding mask and without a break
    (the eager path's additive-mask conversion branches on mask values and is skipped while compiling)."""
    q, k, v, _ = _decode_step(torch.bfloat16, n=70)
    mask = _padding_mask(2, 70)
    with torch.no_grad():
        out = torch.compile(_grouped, fullgraph=True)(q, k, v, mask)
    assert kernel_calls == {"op": 0, "kernel": 0}
    ref = reference_attention(q.float(), k.float(), v.float(), mask, scaling=0.125, is_causal=True)
    assert torch.allclose(out.float(), ref, atol=2e-2), (out.float() - ref).abs().max()


def test_compiled_static_cache_decode_takes_the_operator(fresh_dynamo, kernel_calls):
    """A tiny llama (head dim 64) converted to MQA, left-padded, decoding from a static cache with its forward compiled
    as eval/speed.py compiles it (plus fullgraph=True): every layer of every step calls the operator, and the logits are
    the eager forward's."""
    import transformers as tf
    from transformers.cache_utils import StaticCache

    from hf_attn_swap import swap_attention
    from hf_attn_swap.hf_compat import cache_kwarg

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, pad_token_id=0)
    model = tf.LlamaForCausalLM(config).eval()
    swap_attention(model, "mqa", strategy="mean")
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    name = cache_kwarg(model)

    def decode(forward, steps=3):
        cache = StaticCache(config=config, max_cache_len=16)
        mask = (ids != 0).long()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{name: cache})
        logits = []
        for i in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            nxt = out.logits[:, -1:].argmax(-1)
            out = forward(input_ids=nxt, attention_mask=mask, use_cache=True, **{name: cache},
                          cache_position=torch.tensor([ids.shape[1] + i]))
            logits.append(out.logits)
        return torch.cat(logits, 1)

    with torch.no_grad():
        eager = decode(model)
        kernel_calls.update(op=0, kernel=0)
        compiled = decode(torch.compile(model, dynamic=False, fullgraph=True))
    assert kernel_calls["op"] == 2 * 3  # two layers, three steps
    assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
