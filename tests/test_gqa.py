"""GQA/MQA conversion on every supported architecture (tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import TINY, is_causal_lm, output, tiny

from hf_attn_swap import kv_heads_per_layer, swap_attention, swap_record, unswap_attention
from hf_attn_swap.convert.adapters import get_adapter
from hf_attn_swap.convert.pooling import pool
from hf_attn_swap.convert.projections import build_new_modules, commit, find_attention, read_projections
from hf_attn_swap.hf_compat import cache_kwarg, output_cache
from hf_attn_swap.reference import reference_attention, reference_pool_heads
from hf_attn_swap.variants import band_cpu
from hf_attn_swap.variants.gqa import grouped_attention

ARCHS = sorted(TINY)
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(1))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _kv(model):
    return kv_heads_per_layer(model)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_equal_to_current_kv_heads_is_bit_identical(arch):
    model = tiny(arch)
    before, ref = _state(model), output(model, IDS)
    swap_attention(model, "gqa", groups=_kv(model), strategy="mean")
    assert torch.equal(output(model, IDS), ref)  # exact: no weight changed, grouped SDPA == SDPA
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", ["mean", "fit", "align"])
def test_duplicated_heads_convert_losslessly(arch, strategy):
    model = tiny(arch)
    adapter = get_adapter(model)
    kv = _kv(model)
    # Make each pair of KV heads identical by rewriting the canonical projections, then converting to kv/2 heads
    # must reproduce the model (mean trivially; fit because the duplicated forms have an exact shared factor; align
    # because identical heads are already aligned).
    swap_attention(model, "gqa", groups=kv // 2, strategy="first")
    dup = tiny(arch)
    blocks = []
    for s_dup, s_half in zip(find_attention(dup, adapter), find_attention(model, adapter)):
        p_half = read_projections(s_half.module, s_half.parent, adapter, head_dim=s_half.head_dim)
        p_dup = read_projections(s_dup.module, s_dup.parent, adapter, head_dim=s_dup.head_dim)
        d = s_dup.head_dim

        def twice(w):
            return None if w is None else w.reshape(kv // 2, 1, d, *w.shape[1:]).expand(-1, 2, *([-1] * w.dim())).reshape(kv * d, *w.shape[1:])

        new = p_dup.replace(k_w=twice(p_half.k_w), k_b=twice(p_half.k_b), v_w=twice(p_half.v_w), v_b=twice(p_half.v_b))
        blocks.append(build_new_modules(s_dup, adapter, new))
    commit(blocks)
    ref = output(dup, IDS)
    swap_attention(dup, "gqa", groups=kv // 2, strategy=strategy, calibration=CALIB)
    assert _kv(dup) == kv // 2
    # fp32: the fit goes through float64 factorisations, so only round-off separates it from the original.
    torch.testing.assert_close(output(dup, IDS), ref, atol=2e-5, rtol=1e-4)


def test_mean_pooling_equals_the_explicit_mean():
    w = torch.randn(6 * 8, 32, dtype=torch.float64)
    b = torch.randn(6 * 8, dtype=torch.float64)
    for new in (1, 2, 3, 6):
        assert torch.allclose(pool(w, 6, new, "mean"), reference_pool_heads(w, 6, new, 8), atol=1e-12)
        assert torch.allclose(pool(b, 6, new, "mean"), reference_pool_heads(b, 6, new, 8), atol=1e-12)


def test_converted_llama_weights_are_the_mean_of_the_groups():
    model = tiny("llama")
    k_before = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    swap_attention(model, "gqa", groups=2, strategy="mean")
    k_after = model.model.layers[0].self_attn.k_proj.weight
    assert k_after.shape == (2 * 8, 64)
    torch.testing.assert_close(k_after, reference_pool_heads(k_before, 4, 2, 8), atol=1e-7, rtol=0)  # fp32 mean
    assert model.config.num_key_value_heads == 2
    assert all(layer.self_attn.num_key_value_groups == 4 for layer in model.model.layers)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", ["mean", "first", "random", "fit", "align", "refit"])
def test_every_adapter_converts_to_mqa_and_runs(arch, strategy):
    model = tiny(arch)
    swap_attention(model, "mqa", strategy=strategy, calibration=CALIB)
    assert kv_heads_per_layer(model) == [1, 1]
    out = output(model, IDS)
    assert torch.isfinite(out).all()
    if is_causal_lm(model):
        gen = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen.shape == (2, 16)
        # Incremental decode through the cache gives the logits of a full forward over the same tokens.
        full = output(model, gen)[:, -5:-1]
        with torch.no_grad():
            out = model(gen[:, :-4], use_cache=True)
            steps, past = [out.logits[:, -1]], output_cache(out)
            for t in range(gen.shape[1] - 4, gen.shape[1] - 1):
                out = model(gen[:, t : t + 1], **{cache_kwarg(model): past}, use_cache=True)
                steps.append(out.logits[:, -1])
                past = output_cache(out)
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)  # fp32 summation order
        # The cache really holds one KV head per layer.
        assert past.layers[0].keys.shape[1] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox"])
def test_fit_beats_mean_on_random_weights(arch):
    ref_model = tiny(arch)
    ref = output(ref_model, IDS)
    errs = {}
    for strategy in ("mean", "fit"):
        model = copy.deepcopy(ref_model)
        swap_attention(model, "gqa", groups=1, strategy=strategy, calibration=CALIB)
        errs[strategy] = (output(model, IDS) - ref).pow(2).mean().item()
    assert errs["fit"] < errs["mean"], errs


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_left_padded_batch_matches_rows_alone(arch):
    model = tiny(arch)
    swap_attention(model, "gqa", groups=1, strategy="mean")
    long_row = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(2))
    short_row = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, 4, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=pos).logits
        alone_long = model(long_row).logits
        alone_short = model(short_row).logits
    torch.testing.assert_close(padded[0], alone_long[0], atol=1e-5, rtol=1e-5)  # fp32
    torch.testing.assert_close(padded[1, 4:], alone_short[0], atol=1e-5, rtol=1e-5)


def test_grouped_attention_matches_reference_in_prefill_and_decode():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    for q_len, kv_len in ((7, 7), (1, 9), (3, 9)):
        q = torch.randn(2, 8, q_len, 16)
        k, v = torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 16)
        out, _ = grouped_attention(module, q, k, v, None, scaling=0.25)
        torch.testing.assert_close(out, reference_attention(q, k, v, None, scaling=0.25), atol=1e-5, rtol=1e-5)
        mask = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool)
        mask[1, :, :, :2] = False  # left padding of row 1
        mask &= torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        out, _ = grouped_attention(module, q, k, v, mask, scaling=0.25)
        torch.testing.assert_close(out, reference_attention(q, k, v, mask, scaling=0.25), atol=1e-5, rtol=1e-5)


def test_grouped_decode_does_not_repeat_kv(monkeypatch):
    # The decode path must never call repeat_interleave/expand on K/V: count calls on the K tensor's size.
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 1, 512, 64), torch.randn(1, 1, 512, 64)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kw):
        seen.append((tuple(key.shape), kw.get("enable_gqa", False)))
        return real_sdpa(query, key, value, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with band_cpu.off():  # the SDPA fold (the decode kernel, where it runs, reads K/V in place by construction)
        grouped_attention(module, q, k, v, None)
    assert seen == [((1, 1, 512, 64), False)]  # one KV head read once for all 9 query heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_a_boolean_mask_runs_on_an_additive_one_with_the_same_result(monkeypatch, dtype):
    """At decode shapes the CPU path hands SDPA an additive mask (about 2x faster there than a boolean one); a row that
    attends to nothing keeps the boolean mask, so its output is what SDPA makes of it either way."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(3, 9, 1, 64, dtype=dtype)
    k, v = torch.randn(3, 1, 40, 64, dtype=dtype), torch.randn(3, 1, 40, 64, dtype=dtype)
    mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding
    mask[:, ..., 37:] = False  # a static cache's unused tail
    kinds = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        kinds.append(None if attn_mask is None else attn_mask.dtype)
        return real_sdpa(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with band_cpu.off():  # the SDPA path (fp32 decode takes the decode kernel where it runs: test_decode_kernel.py)
        out, _ = grouped_attention(module, q, k, v, mask)
    ref = reference_attention(q.float(), k.float(), v.float(), mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert kinds == [dtype]

    # The conversion runs once per mask (transformers hands every layer the same tensor), again when it changes.
    from hf_attn_swap.variants import gqa as gqa_mod

    first = gqa_mod._additive_mask(mask, dtype)
    assert gqa_mod._additive_mask(mask, dtype) is first
    mask[2] = False  # in place: a sequence with nothing to attend to, and the boolean mask is kept
    assert gqa_mod._additive_mask(mask, dtype) is mask
    with band_cpu.off():
        out, _ = grouped_attention(module, q, k, v, mask)
    assert kinds[-1] == torch.bool
    folded = q.reshape(3, 1, 9, 64)
    direct = real_sdpa(folded, k, v, attn_mask=mask.expand(3, 1, 9, 40)).reshape(3, 9, 1, 64).transpose(1, 2)
    torch.testing.assert_close(out, direct, equal_nan=True)


# ---------------------------------------------------------------------------------------------- bad input


def _unchanged(model, before, impl):
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config._attn_implementation == impl
    assert swap_record(model) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="nope"), "known variants: .*gqa"),
        (dict(variant="gqa", groups=3), "must divide"),
        (dict(variant="gqa", groups=8), "larger than layer 0's current KV heads"),
        (dict(variant="gqa", groups=0), "positive integer"),
        (dict(variant="gqa", groups=2, strategy="median"), "allowed: mean, first, random, fit, align"),
        (dict(variant="gqa", groups=2, window=4), "its options are: groups, seed, strategy"),
        (dict(variant="gqa", groups=2, strategy="fit"), "calibration"),
        (dict(variant="gqa", groups=2, layers=[5]), "out of range"),
    ],
)
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, message):
    model = tiny("llama")
    before, impl = _state(model), model.config._attn_implementation
    variant = kwargs.pop("variant")
    with pytest.raises(ValueError, match=message):
        swap_attention(model, variant, **kwargs)
    _unchanged(model, before, impl)


def test_unsupported_model_type_names_the_supported_ones():
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                           num_attention_heads=4, word_embed_proj_dim=32)).eval()
    with pytest.raises(ValueError, match=r"'opt' is not supported \(OPT reshapes.*supported model types: bert"):
        swap_attention(model, "gqa", groups=2)


def test_quantized_model_is_refused_unchanged():
    model = tiny("llama")
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    before = _state(model)
    with pytest.raises(ValueError, match="quantized model"):
        swap_attention(model, "gqa", groups=2)
    _unchanged(model, before, "sdpa")


def test_failed_commit_rolls_back(monkeypatch):
    from hf_attn_swap.convert import projections

    model = tiny("llama")
    before = _state(model)
    calls = {"n": 0}
    real_setattr = projections.setattr if hasattr(projections, "setattr") else setattr

    def flaky(owner, attr, value):
        calls["n"] += 1
        if calls["n"] == 5:  # fail in the middle of the second module's assignments
            raise RuntimeError("disk on fire")
        real_setattr(owner, attr, value)

    monkeypatch.setattr(projections, "setattr", flaky, raising=False)
    with pytest.raises(RuntimeError, match="disk on fire"):
        swap_attention(model, "gqa", groups=1)
    monkeypatch.undo()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert kv_heads_per_layer(model) == [4, 4]


def test_undo_of_lossy_conversion_raises_and_says_why():
    model = tiny("llama")
    swap_attention(model, "gqa", groups=2)
    with pytest.raises(ValueError, match="cannot undo gqa.*reload the original checkpoint"):
        unswap_attention(model)
