"""sliding_window / linear / flash / sparse inside tiny random transformers models (fp32, CPU).

The oracle is the same model with every variant computing through hf_attn_swap.reference (``reference_mode``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_attn_swap import swap_attention, swap_record, unswap_attention
from hf_attn_swap.hf_compat import cache_kwarg, output_cache
from hf_attn_swap.variants._common import reference_mode
from hf_attn_swap.variants.cache_layers import KVWindowLayer, LinearStateLayer
from hf_attn_swap.variants.sliding_window import vanilla_export

TOL = 1e-4  # fp32 logits after 2 layers, blocked/chunked vs dense sums

V = 97


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common)).eval()
    if arch == "gemma3_text":
        cfg = Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=6,
                               layer_types=["sliding_attention", "full_attention"], **common)
        return Gemma3ForCausalLM(cfg).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256)).eval()
    if arch == "bert":
        return BertModel(BertConfig(**common)).eval()
    raise KeyError(arch)


DECODERS = ["llama", "qwen2", "gemma3_text", "gpt2"]
VARIANTS = {
    "sliding_window": {"window": 5, "sinks": 2, "block_size": 4},
    "linear": {"feature_map": "elu", "chunk_size": 4},
    "flash": {},
    "sparse": {"window": 4, "global_tokens": 2, "random_blocks": 1, "block_size": 4, "seed": 1},
}


def _ids(b=2, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, n), generator=g)
    am = torch.ones(b, n, dtype=torch.long)
    am[-1, :5] = 0  # left padding on the last row
    return ids, am


def _logits(model, ids, am=None, **kw):
    out = model(input_ids=ids, attention_mask=am, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _prefill_then_decode(model, ids, am, split):
    """Logits of a prefill of ``split`` tokens, then one token at a time through the cache."""
    out = model(input_ids=ids[:, :split], attention_mask=am[:, :split], use_cache=True)
    cache, steps = output_cache(out), [out.logits]
    for t in range(split, ids.shape[1]):
        o = model(input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], **{cache_kwarg(model): cache},
                  use_cache=True)
        steps.append(o.logits)
    return torch.cat(steps, 1)


def _check_prefill_and_decode(model):
    """A left-padded batch: prefill == reference, and prefill of 10 tokens then one token at a time through the
    cache == one prefill. Returns the ids and mask used."""
    ids, am = _ids()
    keep = am.bool()
    with torch.no_grad():
        fast = _logits(model, ids, am, use_cache=False)
        with reference_mode():
            ref = _logits(model, ids, am, use_cache=False)
        assert torch.allclose(fast[keep], ref[keep], atol=TOL), (fast - ref)[keep].abs().max()
        dec = _prefill_then_decode(model, ids, am, 10)
        assert torch.allclose(dec[keep], fast[keep], atol=TOL), (dec - fast)[keep].abs().max()
    return ids, am


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_matches_reference_and_decode(arch, variant):
    model = make(arch)
    swap_attention(model, variant, **VARIANTS[variant])
    _check_prefill_and_decode(model)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality(arch, variant):
    model = make(arch)
    swap_attention(model, variant, **VARIANTS[variant])
    ids, _ = _ids(b=1, n=20)
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % V
    with torch.no_grad():
        a, b = _logits(model, ids), _logits(model, changed)
    assert torch.equal(a[:, :12], b[:, :12])  # exact: earlier positions never read a later token
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_window_at_least_sequence_equals_full_attention(arch):
    base, model = make(arch), make(arch)
    # Gemma-3's layer 0 keeps its own 6-token window (untouched, through the dispatcher); layer 1 is its full layer.
    layers = [1] if arch == "gemma3_text" else None
    swap_attention(model, "sliding_window", layers=layers, window=64, block_size=8)
    ids, am = _ids(n=30)
    with torch.no_grad():
        ref, fast = _logits(base, ids, am), _logits(model, ids, am)
    keep = am.bool()
    assert torch.allclose(fast[keep], ref[keep], atol=TOL), (fast - ref)[keep].abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gpt2"])
def test_bounded_cache_after_generating_four_windows(arch):
    window, sinks = 6, 2
    model = make(arch)
    swap_attention(model, "sliding_window", window=window, sinks=sinks)
    ids, am = _ids(n=8)
    with torch.no_grad():
        out = _generate(model, ids, am, 4 * window)
    layers = output_cache(out).layers
    assert all(isinstance(l, KVWindowLayer) for l in layers)
    for l in layers:
        assert l.keys.shape[2] <= window + sinks and l.values.shape[2] <= window + sinks
        assert l.get_seq_length() == 8 + 4 * window - 1
    _check_generate_against_reference(model, out, am)


def _generate(model, ids, am, n):
    return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True)


def _check_generate_against_reference(model, out, am):
    """Every step's logits from generate() (bounded/recurrent cache) == one reference pass over the final sequence.

    generate() derives position ids from the padding mask (cumsum - 1); the reference pass must use the same.
    """
    seq = out.sequences
    steps = len(out.logits)
    mask = torch.cat([am, torch.ones(am.shape[0], steps, dtype=am.dtype)], 1)
    with torch.no_grad(), reference_mode():
        ref = _logits(model, seq, mask, use_cache=False, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    gen = torch.stack(out.logits, 1)
    ref = ref[:, am.shape[1] - 1 : -1]
    assert torch.allclose(gen, ref, atol=TOL), (gen - ref).abs().max()


def test_linear_decode_keeps_constant_memory():
    model = make("llama")
    swap_attention(model, "linear", feature_map="performer")
    ids, am = _ids(n=8)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=20, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    sizes = {l.nbytes() for l in output_cache(out).layers}
    assert all(isinstance(l, LinearStateLayer) for l in output_cache(out).layers)
    assert sizes == {2 * 2 * 16 * 16 * 4 + 2 * 2 * 16 * 4}  # S + z per KV head (fp32); no K/V, nothing grows


# ------------------------------------------------------------------ linear + softmax window (LoLCATs hybrid)

HYBRID = {"feature_map": "hedgehog", "num_features": 8, "window": 5, "chunk_size": 4}


def _hybrid(arch, **over):
    from hf_attn_swap.variants.linear import feature_maps

    model = make(arch)
    swap_attention(model, "linear", **{**HYBRID, **over})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the initial weight 1, so that both parts of every row count
        for fm in feature_maps(model).values():
            fm.log_gamma.copy_(torch.randn(fm.log_gamma.shape, generator=g))
    return model


@pytest.mark.parametrize("arch", DECODERS)
def test_hybrid_prefill_decode_and_generate_match_reference(arch):
    model = _hybrid(arch)
    ids, am = _check_prefill_and_decode(model)
    with torch.no_grad():
        gen = _generate(model, ids[:, :8], am[:, :8], 4 * HYBRID["window"])
    _check_generate_against_reference(model, gen, am[:, :8])
    for layer in output_cache(gen).layers:  # bounded: window - 1 keys plus the state, however long it ran
        assert type(layer).__name__ == "HybridStateLayer"
        assert layer.keys.shape[2] == HYBRID["window"] - 1 and layer.state_s is not None


def test_hybrid_both_parts_matter_and_window_covering_everything_is_softmax():
    base = make("llama")
    ids, am = _ids(n=20)
    keep = am.bool()
    with torch.no_grad():
        want = _logits(base, ids, am)
        wide = _hybrid("llama", window=64)  # no key is ever older than the window: plain softmax attention
        assert torch.allclose(_logits(wide, ids, am)[keep], want[keep], atol=TOL)
        narrow = _hybrid("llama")
        a = _logits(narrow, ids, am)
        assert not torch.allclose(a[keep], want[keep], atol=1e-2)
        from hf_attn_swap.variants.linear import feature_maps

        for fm in feature_maps(narrow).values():
            fm.log_gamma.sub_(3.0)  # the linear part's share of each row grows
        assert not torch.allclose(_logits(narrow, ids, am)[keep], a[keep], atol=1e-3)


def test_hybrid_gradients_match_reference():
    from hf_attn_swap.variants.linear import feature_map_parameters

    model = _hybrid("qwen2")
    ids, am = _ids(n=18)
    keep = am.bool()
    params = feature_map_parameters(model) + [model.model.layers[0].self_attn.q_proj.weight]
    grads = []
    for ref in (False, True):
        model.zero_grad()
        with reference_mode() if ref else contextlib.nullcontext():
            _logits(model, ids, am)[keep].pow(2).mean().backward()
        grads.append([p.grad.clone() for p in params])
    names = {id(p) for p in feature_map_parameters(model)}
    assert any(p.grad.abs().sum() > 0 for p in params if id(p) in names)
    for a, r in zip(*grads):
        assert torch.allclose(a, r, atol=1e-5, rtol=1e-4), (a - r).abs().max()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_per_layer_mixture_forward_and_generate(arch):
    model = make(arch)
    plan = {"0": ("sliding_window", {"window": 4, "sinks": 1}), "1": ("linear", {"feature_map": "hedgehog"})}
    swap_attention(model, plan)
    ids, am = _ids(n=16)
    keep = am.bool()
    with torch.no_grad():
        fast = _logits(model, ids, am, use_cache=False)
        with reference_mode():
            ref = _logits(model, ids, am, use_cache=False)
        assert torch.allclose(fast[keep], ref[keep], atol=TOL)
        out = _generate(model, ids, am, 12)
    assert [type(l).__name__ for l in output_cache(out).layers] == ["KVWindowLayer", "LinearStateLayer"]
    _check_generate_against_reference(model, out, am)


def test_mixture_with_untouched_layer_and_sparse():
    model = make("llama")
    swap_attention(model, {"0": ("sparse", VARIANTS["sparse"])})
    ids, am = _ids(n=20)
    with torch.no_grad():
        fast = _logits(model, ids, am, use_cache=False)
        with reference_mode():
            ref = _logits(model, ids, am, use_cache=False)
    assert torch.allclose(fast[am.bool()], ref[am.bool()], atol=TOL)


@pytest.mark.parametrize("variant", ["flash", "sparse"])
def test_bert_bidirectional(variant):
    model = make("bert")
    swap_attention(model, variant, **VARIANTS[variant])
    ids, am = _ids(n=20)
    with torch.no_grad():
        fast = _logits(model, ids, am)
        with reference_mode():
            ref = _logits(model, ids, am)
    assert torch.allclose(fast[am.bool()], ref[am.bool()], atol=TOL)
    if variant == "flash":  # exact: equals the untouched model
        with torch.no_grad():
            base = _logits(make("bert"), ids, am)
        assert torch.allclose(fast[am.bool()], base[am.bool()], atol=TOL)


@pytest.mark.parametrize("variant", ["sliding_window", "linear"])
def test_causal_only_variants_refuse_encoders(variant):
    model = make("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="bidirectional encoder.*allowed here: flash, sparse"):
        swap_attention(model, variant)
    assert swap_record(model) is None and model.config._attn_implementation != variant
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", DECODERS)
def test_flash_is_exact_and_reports_backend(arch):
    from hf_attn_swap.variants.flash import flash_backends

    base, model = make(arch), make(arch)
    swap_attention(model, "flash")
    ids, am = _ids()
    with torch.no_grad():
        a, b = _logits(base, ids, am), _logits(model, ids, am)
    assert torch.allclose(a[am.bool()], b[am.bool()], atol=TOL)
    assert set(flash_backends(model).values()) == {"sdpa_flash"}


def test_unswap_restores_model_and_cache():
    model = make("llama")
    ids, am = _ids()
    with torch.no_grad():
        before = _logits(model, ids, am)
    swap_attention(model, {"0": ("linear", {"feature_map": "hedgehog"}), "1": ("sliding_window", {"window": 3})})
    assert any("hf_attn_swap_feature_map" in k for k in model.state_dict())
    unswap_attention(model)
    assert not any("hf_attn_swap_feature_map" in k for k in model.state_dict())
    with torch.no_grad():
        after = _logits(model, ids, am)
        out = model(input_ids=ids, attention_mask=am, use_cache=True)
    assert torch.equal(before, after)
    assert not any(isinstance(l, (KVWindowLayer, LinearStateLayer)) for l in output_cache(out).layers)


# ------------------------------------------------------------------ vanilla export (sliding_window)


def test_llama_window_exports_to_mistral_exactly():
    model = make("llama")
    swap_attention(model, "sliding_window", window=5)
    cfg = vanilla_export(model, swap_record(model).steps[0])
    assert cfg is not None and cfg.model_type == "mistral" and cfg.sliding_window == 5
    mistral = MistralForCausalLM(cfg).eval()
    mistral.load_state_dict(model.state_dict(), strict=True)
    ids, am = _ids(n=20)
    with torch.no_grad():
        a, b = _logits(model, ids, am), _logits(mistral, ids, am)
        assert torch.allclose(a[am.bool()], b[am.bool()], atol=TOL)
        g1 = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=15, do_sample=False, pad_token_id=0)
        g2 = mistral.generate(input_ids=ids, attention_mask=am, max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


def test_qwen2_window_exports_to_its_own_sliding_window():
    model = make("qwen2")
    swap_attention(model, "sliding_window", window=5)
    cfg = vanilla_export(model, swap_record(model).steps[0])
    assert cfg is not None and cfg.model_type == "qwen2" and cfg.layer_types == ["sliding_attention"] * 2
    vanilla = Qwen2ForCausalLM(cfg).eval()
    vanilla.load_state_dict(model.state_dict(), strict=True)
    ids, am = _ids(n=20)
    with torch.no_grad():
        a, b = _logits(model, ids, am), _logits(vanilla, ids, am)
    assert torch.allclose(a[am.bool()], b[am.bool()], atol=TOL)


@pytest.mark.parametrize(
    "arch,options,layers",
    [("llama", {"window": 5, "sinks": 1}, None), ("llama", {"window": 5}, [0]), ("gpt2", {"window": 5}, None),
     ("gemma3_text", {"window": 5}, None)],
)
def test_no_vanilla_form_means_sidecar(arch, options, layers):
    model = make(arch)
    swap_attention(model, "sliding_window", layers=layers, **options)
    assert vanilla_export(model, swap_record(model).steps[0]) is None


def test_llama_with_bias_has_no_mistral_form():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, attention_bias=True)).eval()
    swap_attention(model, "sliding_window", window=4)
    assert vanilla_export(model, swap_record(model).steps[0]) is None


# ------------------------------------------------------------------ hedgehog / performer state


def test_hedgehog_is_trainable_and_deterministic():
    from hf_attn_swap.variants.linear import feature_map_parameters

    a, b = make("llama"), make("llama")
    swap_attention(a, "linear", feature_map="hedgehog", num_features=8)
    swap_attention(b, "linear", feature_map="hedgehog", num_features=8)
    params = feature_map_parameters(a)
    assert params and all(p.requires_grad for p in params)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["model.layers.0.self_attn.hf_attn_swap_feature_map.q_weight"].shape == (4, 16, 8)
    ids, _ = _ids(b=1, n=12)
    loss = _logits(a, ids).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_performer_redraw_changes_features_deterministically():
    from hf_attn_swap.variants.linear import feature_maps, redraw_performer_features

    model = make("llama")
    swap_attention(model, "linear", feature_map="performer")
    before = feature_maps(model)[0].projection.clone()
    assert redraw_performer_features(model, seed=11) == 2
    after = feature_maps(model)[0].projection.clone()
    redraw_performer_features(model, seed=11)
    assert not torch.equal(before, after) and torch.equal(after, feature_maps(model)[0].projection)


# ------------------------------------------------------------------ bad input: clear errors, model unchanged


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation


def _unchanged(model, snap):
    sd, impl = snap
    now = model.state_dict()
    return (sd.keys() == now.keys() and all(torch.equal(sd[k], now[k]) for k in sd)
            and model.config._attn_implementation == impl and swap_record(model) is None
            and not any(hasattr(m, "hf_attn_swap") for m in model.modules()))


@pytest.mark.parametrize(
    "variant,options,match",
    [
        ("sliding_window", {"window": 0}, "window must be a positive integer"),
        ("sliding_window", {"window": -3}, "window must be a positive integer"),
        ("sliding_window", {"window": 4, "sinks": 4}, "sinks=4 must be smaller than window=4; allowed: 0 <= sinks"),
        ("sliding_window", {"window": 4, "sinks": -1}, "sinks must be a non-negative integer"),
        ("sliding_window", {"widow": 4}, "unknown option.*'widow'.*options are: block_size, sinks, window"),
        ("linear", {"feature_map": "softmax"}, "unknown feature map 'softmax'; allowed: elu, relu, performer"),
        ("linear", {"kernel": "triton"}, "unknown kernel 'triton'; allowed: auto, torch, fla"),
        ("linear", {"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ("linear", {"window": -1}, "window must be an integer >= 0"),
        ("linear", {"window": 8, "kernel": "fla"}, "kernel='fla' has no softmax-window hybrid; allowed with window"),
        ("flash", {"backend": "xformers"}, "unknown flash backend 'xformers'; allowed: auto, flash_attn"),
        ("sparse", {"window": 0}, "window must be an integer >= 1"),
        ("sparse", {"block_size": 4096}, "sparse blocks do not fit the model's context of"),
        ("sparse", {"random_blocks": 100, "block_size": 64}, "sparse blocks do not fit.*allowed: block_size <="),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_options_raise_clearly_and_leave_model_unchanged(variant, options, match):
    model = make("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        swap_attention(model, variant, **options)
    assert _unchanged(model, snap)


def test_bad_layer_in_a_plan_changes_nothing():
    model = make("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="sinks"):
        swap_attention(model, {"0": ("linear", {"feature_map": "hedgehog"}), "1": ("sliding_window",
                                                                                 {"window": 2, "sinks": 5})})
    assert _unchanged(model, snap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_flash_attn_without_cuda_is_a_clear_error():
    model = make("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="backend='flash_attn' cannot run: .*CUDA only; allowed here: backend='auto'"):
        swap_attention(model, "flash", backend="flash_attn")
    with pytest.raises(ValueError, match="backend='transformers' needs"):
        swap_attention(model, "flash", backend="transformers")
    assert _unchanged(model, snap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_fla_without_cuda_is_a_clear_error():
    model = make("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="kernel='fla' needs"):
        swap_attention(model, "linear", kernel="fla")
    assert _unchanged(model, snap)


def test_hedgehog_checkpoint_without_trained_state_is_refused():
    from hf_attn_swap.variants.linear import require_feature_map_state

    model = make("llama")
    swap_attention(model, "linear", feature_map="hedgehog")
    full = model.state_dict()
    require_feature_map_state(model, full.keys())  # complete: fine
    stripped = [k for k in full if "hf_attn_swap_feature_map" not in k]
    with pytest.raises(ValueError, match="no trained hedgehog feature-map state.*save the model after attention"):
        require_feature_map_state(model, stripped)


def test_static_cache_is_refused_clearly():
    model = make("llama")
    swap_attention(model, "sliding_window", window=4)
    ids, am = _ids(n=6)
    with pytest.raises(ValueError, match="cannot use a static cache"):
        model.generate(input_ids=ids, attention_mask=am, max_new_tokens=3, cache_implementation="static",
                       pad_token_id=0)


# ------------------------------------------------------------------ CUDA kernels (run only where they exist)

_HAS_FLASH_ATTN = torch.cuda.is_available() and __import__("importlib").util.find_spec("flash_attn") is not None
_HAS_FLA = torch.cuda.is_available() and __import__("importlib").util.find_spec("fla") is not None


@pytest.mark.skipif(not _HAS_FLASH_ATTN, reason="needs CUDA and flash_attn")
def test_flash_attn_on_cuda_matches_reference():  # pragma: no cover - GPU only
    from hf_attn_swap.variants.flash import flash_backends

    model = make("llama").cuda().to(torch.bfloat16)
    swap_attention(model, "flash", backend="flash_attn")
    ids = torch.randint(1, V, (2, 64), device="cuda")
    with torch.no_grad():
        fast = _logits(model, ids).float()
        with reference_mode():
            ref = _logits(model, ids).float()
    assert torch.allclose(fast, ref, atol=5e-2)  # bf16
    assert set(flash_backends(model).values()) == {"flash_attn"}


@pytest.mark.skipif(not _HAS_FLA, reason="needs CUDA and flash-linear-attention")
def test_fla_linear_on_cuda_matches_torch_path():  # pragma: no cover - GPU only
    a = make("llama").cuda()
    b = make("llama").cuda()
    swap_attention(a, "linear", kernel="fla")
    swap_attention(b, "linear", kernel="torch")
    ids = torch.randint(1, V, (2, 128), device="cuda")
    with torch.no_grad():
        assert torch.allclose(_logits(a, ids), _logits(b, ids), atol=1e-3)  # fla may use tf32


def test_hybrid_beam_search_cache_equals_no_cache():
    """Beam search reorders and repeats every per-batch tensor of the cache, the recurrent state included: with the
    cache it must pick the same beams, with the same scores, as recomputing every step from scratch."""
    model = _hybrid("llama")
    ids, am = _ids(b=2, n=9)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = model.generate(use_cache=True, **kw)
        fresh = model.generate(use_cache=False, **kw)
    assert type(output_cache(cached).layers[0]).__name__ == "HybridStateLayer"
    assert torch.equal(cached.sequences, fresh.sequences)
    assert torch.allclose(cached.sequences_scores, fresh.sequences_scores, atol=TOL)
