"""Swaps are transactions; untouched layers keep the model's own attention; one INFO line per swap.

Fault injection: a failure is raised at every step of ``swap_attention`` (validation, conversion, the conversion's
commit, prepare, layer attach, implementation select, a custom variant's hooks), after that step has done its work, for
every built-in variant and for every plan shape (single variant, layer subset, mixed per-layer plan, a second swap on
an already swapped model). The model must then equal a pristine copy in every way a user can see.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import transformers as tf
from tiny_models import COMMON, SPECIAL
from transformers import AttentionInterface

import hf_attn_swap.api as api
import hf_attn_swap.variants.gqa as gqa_mod
from hf_attn_swap import (
    VariantConfig,
    get_variant,
    kv_heads_per_layer,
    layer_swap,
    register_variant,
    swap_attention,
    swap_record,
    unswap_attention,
)
from hf_attn_swap.registry import _REGISTRY
from hf_attn_swap.variants.gqa import grouped_attention

IDS = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))


class Boom(RuntimeError):
    """The injected failure."""


def _then_raise(fn, on_call: int = 1):
    """``fn`` wrapped to do its work and then raise on its ``on_call``-th call (earlier calls pass)."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= on_call:
            raise Boom("injected failure")
        return out

    return wrapped


def _model(n_layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": n_layers}, num_key_value_heads=4, head_dim=8, **SPECIAL)
    return tf.LlamaForCausalLM(cfg).eval()


# --- what a pristine copy and a rolled-back model must share -------------------------------------------------------


def _hooks(m: torch.nn.Module) -> list:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs),
             len(m._forward_pre_hooks_with_kwargs))]


def _fingerprint(model: torch.nn.Module) -> dict:
    """Everything except tensors that a swap could change, in comparable form."""
    mods = dict(model.named_modules())
    return {
        "modules": [(n, type(m).__qualname__) for n, m in mods.items()],
        "attrs": {n: sorted(k for k in vars(m) if not k.startswith("_output_capturing")) for n, m in mods.items()},
        "hooks": {n: _hooks(m) for n, m in mods.items()},
        "kv_groups": [getattr(m, "num_key_value_groups", None) for m in mods.values()],
        "config": model.config.to_dict(),
        "impl": model.config._attn_implementation,
        "sub_impl": [getattr(m.config, "_attn_implementation", None) for m in mods.values() if hasattr(m, "config")],
        "record": None if swap_record(model) is None else swap_record(model).to_dict(),
        "layer_swaps": [repr(layer_swap(m)) for m in mods.values()],
    }


@torch.no_grad()
def _behaviour(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Forward logits (with padding), and greedy generate with the cache: tokens and per-step logits."""
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding in the second row
    logits = model(IDS, attention_mask=mask).logits
    gen = model.generate(IDS, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    return logits, gen.sequences, gen.logits


def assert_unchanged(model, pristine, params_before) -> None:
    """``model`` (after a failed swap) equals ``pristine`` (a deep copy taken before it)."""
    sd, ref = model.state_dict(), pristine.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and sd[k].shape == ref[k].shape and torch.equal(sd[k], ref[k]), k
    now = dict(model.named_parameters())
    assert list(now) == list(params_before)
    assert all(now[n] is p for n, p in params_before.items())  # the very same Parameter objects
    assert _fingerprint(model) == _fingerprint(pristine)
    logits, seq, step_logits = _behaviour(model)
    ref_logits, ref_seq, ref_step = _behaviour(pristine)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(seq, ref_seq)
    assert all(torch.equal(a, b) for a, b in zip(step_logits, ref_step, strict=True))


# --- the faults ---------------------------------------------------------------------------------------------------

#: every built-in variant with options that run on the tiny llama (8 heads, 4 KV heads)
VARIANTS = {
    "gqa_mean": ("gqa", {"groups": 2}),
    "gqa_fit": ("gqa", {"groups": 2, "strategy": "fit"}),
    "gqa_align": ("gqa", {"groups": 2, "strategy": "align"}),
    "gqa_refit": ("gqa", {"groups": 2, "strategy": "refit"}),
    "mqa": ("mqa", {}),
    "sliding_window": ("sliding_window", {"window": 3, "sinks": 1}),
    "linear": ("linear", {"feature_map": "hedgehog"}),
    "linear_hybrid": ("linear", {"feature_map": "elu", "window": 3}),
    "flash": ("flash", {}),
    "sparse": ("sparse", {"window": 3, "global_tokens": 1, "block_size": 2}),
}
STEPS = ("validate", "convert", "commit", "prepare", "attach", "select", "log")


def _inject(monkeypatch, step: str, variant: str) -> bool:
    """Make ``step`` fail for ``variant``; False when the variant has no such step."""
    spec = get_variant(variant)
    if step == "validate":
        monkeypatch.setattr(spec.config_cls, "check_model", _then_raise(spec.config_cls.check_model))
    elif step in ("convert", "prepare"):
        fn = getattr(spec, step)
        if fn is None:
            return False
        monkeypatch.setitem(_REGISTRY, variant, dataclasses.replace(spec, **{step: _then_raise(fn)}))
    elif step == "commit":
        if spec.convert is None:
            return False
        monkeypatch.setattr(gqa_mod, "commit", _then_raise(gqa_mod.commit))
    elif step == "attach":
        monkeypatch.setattr(api, "_attach_layer", _then_raise(api._attach_layer, on_call=2))  # one layer attached
    elif step == "select":
        monkeypatch.setattr(api, "_select_implementation", _then_raise(api._select_implementation))
    elif step == "log":
        monkeypatch.setattr(api, "_summary", _then_raise(api._summary))
    return True


def _has_step(variant: str, step: str) -> bool:
    spec = get_variant(variant)
    return {"convert": spec.convert, "commit": spec.convert, "prepare": spec.prepare}.get(step, True) is not None


def _cases(keys, steps=STEPS) -> list[tuple[str, str]]:
    """(variant key, step) pairs where the variant has that step (gqa has no prepare, flash no convert...)."""
    return [(k, s) for k in keys for s in steps if _has_step(VARIANTS[k][0], s)]


def _fails_cleanly(model, monkeypatch, step: str, variant_for_step: str, call) -> None:
    pristine = copy.deepcopy(model)
    params = dict(model.named_parameters())
    with monkeypatch.context() as mp:
        assert _inject(mp, step, variant_for_step)
        with pytest.raises(Boom):
            call()
    assert_unchanged(model, pristine, params)


@pytest.mark.parametrize("key,step", _cases(sorted(VARIANTS)))
def test_every_variant_rolls_back_at_every_step(key, step, monkeypatch):
    name, options = VARIANTS[key]
    model = _model()
    _fails_cleanly(model, monkeypatch, step, name,
                   lambda: swap_attention(model, name, calibration=CALIB, **options))


@pytest.mark.parametrize("key,step", _cases(["gqa_fit", "sliding_window", "linear", "sparse"]))
def test_layer_subset_rolls_back(key, step, monkeypatch):
    name, options = VARIANTS[key]
    model = _model()
    _fails_cleanly(model, monkeypatch, step, name,
                   lambda: swap_attention(model, name, layers=[0, 2], calibration=CALIB, **options))


MIXED = {"0": VARIANTS["sliding_window"], "1": VARIANTS["linear"], "2": VARIANTS["gqa_fit"]}


VARIANT_STEPS = ("validate", "convert", "commit", "prepare")
MIXED_CASES = [(s, v) for s in VARIANT_STEPS for v in ("sliding_window", "linear", "gqa") if _has_step(v, s)] + [
    (s, "gqa") for s in STEPS if s not in VARIANT_STEPS
]


@pytest.mark.parametrize("step,variant", MIXED_CASES)
def test_mixed_plan_rolls_back(step, variant, monkeypatch):
    model = _model()
    _fails_cleanly(model, monkeypatch, step, variant, lambda: swap_attention(model, MIXED, calibration=CALIB))


@pytest.mark.parametrize("second,step", _cases(["gqa_fit", "linear", "flash"]))
def test_second_swap_rolls_back_to_the_first(second, step, monkeypatch):
    model = _model()
    swap_attention(model, "sliding_window", layers=[0], window=3)
    name, options = VARIANTS[second]
    _fails_cleanly(model, monkeypatch, step, name,
                   lambda: swap_attention(model, name, layers=[1, 2], calibration=CALIB, **options))
    # The first swap is intact and still undoes exactly.
    assert [s.variant for s in swap_record(model).steps] == ["sliding_window"]
    unswap_attention(model)
    assert torch.equal(_behaviour(model)[0], _behaviour(_model())[0])


def test_issue_reproduction_bad_calibration_in_second_plan_entry():
    """The reported case: {"0": sliding_window, "1": gqa fit} with calibration ids outside the vocabulary."""
    model = _model()
    pristine, params = copy.deepcopy(model), dict(model.named_parameters())
    bad = torch.full((1, 8), 10_000)
    with pytest.raises(IndexError):
        swap_attention(model, {"0": ("sliding_window", {"window": 2}), "1": ("gqa", {"groups": 2, "strategy": "fit"})},
                       calibration=bad)
    assert_unchanged(model, pristine, params)
    with pytest.raises(ValueError, match="no attention swap to undo"):
        unswap_attention(model)


@dataclasses.dataclass
class MeddleConfig(VariantConfig):
    where: str = "convert"


def _meddle(model, config, layers, **kw):
    """A custom hook that changes everything it can reach the way a careless user hook would, then fails."""
    attn = model.model.layers[layers[0]].self_attn
    attn.k_proj = torch.nn.Linear(64, 16, bias=False)  # replaced submodule
    attn.num_key_value_groups = 4
    attn.register_forward_pre_hook(lambda *a: None)
    attn.extra_state = "junk"
    attn.__class__ = type("Meddled", (type(attn),), {})
    model.config.num_key_value_heads = 2
    model.config.sliding_window = 7
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    model.set_attn_implementation("eager")
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    if config.where == "convert" and kw.get("fail", True):
        raise Boom("custom convert failed")
    return {}


def _meddle_prepare(model, config, layers):
    _meddle(model, config, layers, fail=False)
    if config.where == "prepare":
        raise Boom("custom prepare failed")


@pytest.fixture
def meddling_variant():
    register_variant("test_meddle", grouped_attention, config=MeddleConfig, convert=_meddle, prepare=_meddle_prepare,
                     overwrite=True)
    yield "test_meddle"
    _REGISTRY.pop("test_meddle", None)


@pytest.mark.parametrize("where", ["convert", "prepare"])
@pytest.mark.parametrize("already_swapped", [False, True])
def test_custom_variant_hooks_roll_back(meddling_variant, where, already_swapped):
    model = _model()
    if already_swapped:
        swap_attention(model, "linear", layers=[2])
    pristine, params = copy.deepcopy(model), dict(model.named_parameters())
    with pytest.raises(Boom):
        swap_attention(model, {"0-1": (meddling_variant, {"where": where}), "2": "flash"} if not already_swapped
                       else {"0-1": (meddling_variant, {"where": where})})
    assert_unchanged(model, pristine, params)


def test_in_place_tensor_writes_are_reported(caplog):
    """The journal cannot undo writes into existing tensors (it copies none); it says so instead of hiding it."""

    def scribble(model, config, layers, **kw):
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.weight.mul_(2)
        raise Boom("after an in-place write")

    register_variant("test_scribble", grouped_attention, convert=scribble, overwrite=True)
    try:
        with caplog.at_level(logging.ERROR, logger="hf_attn_swap"), pytest.raises(Boom):
            swap_attention(_model(), "test_scribble")
    finally:
        _REGISTRY.pop("test_scribble", None)
    assert any("in place" in r.getMessage() and "k_proj" in r.getMessage() for r in caplog.records)


# --- untouched layers keep the model's own attention ---------------------------------------------------------------


def _gemma2_eager(n_layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(**{**COMMON, "num_hidden_layers": n_layers}, num_key_value_heads=4, head_dim=8,
                          sliding_window=4, attn_implementation="eager", **SPECIAL)
    assert cfg.attn_logit_softcapping and cfg.layer_types[0] == "sliding_attention"
    return tf.Gemma2ForCausalLM(cfg).eval()


@torch.no_grad()
def test_untouched_gemma2_layers_keep_eager_softcap_and_windows():
    """Gemma-2 eager (softcap, sliding layers of window 4 on 10 tokens): swapping layer 0 only must leave layers 1
    (full) and 2 (sliding) on Gemma-2's eager; before, every forward raised "sdpa does not support softcap"."""
    model = _gemma2_eager()
    ref = copy.deepcopy(model)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    # groups=4 keeps the 4 KV heads: no weight change, and gqa's attention with softcap is exact (dense reference).
    swap_attention(model, "gqa", groups=4, layers=[0])
    assert model.config._attn_implementation == "hf_attn_swap"
    out = model(IDS, attention_mask=mask).logits
    real = mask.bool()  # padding positions attend to nothing: each implementation fills them its own way
    torch.testing.assert_close(out[real], ref(IDS, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-5)
    gen = model.generate(IDS, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref.generate(IDS, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         pad_token_id=0))


@torch.no_grad()
def test_saved_partial_swap_of_an_eager_gemma2_reloads_with_eager_untouched_layers(tmp_path):
    """load_swapped replays the plan on a model transformers loads eager (Gemma-2 with softcap): the untouched
    layers run Gemma-2's eager again and the reloaded model computes what the saved one did."""
    from hf_attn_swap.checkpoint import load_swapped, save_swapped

    model = _gemma2_eager()
    swap_attention(model, "gqa", groups=2, layers=[0])  # a real conversion on layer 0 only
    want = model(IDS).logits
    again = load_swapped(save_swapped(model, tmp_path / "partial"))
    assert again.model.layers[1].self_attn.__dict__["_hf_attn_swap_base_impl"] == "eager"
    torch.testing.assert_close(again(IDS).logits, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("loaded_with", ["eager", "sdpa"])
def test_untouched_layers_run_the_loaded_implementation_exactly(loaded_with):
    """An exact attention-only swap (flash) of layer 0 gives the unswapped model's logits, and with eager the
    untouched layers return their attention weights (transformers collects only the layers that return weights)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=4, head_dim=8,
                         attn_implementation=loaded_with, **SPECIAL)
    model = tf.LlamaForCausalLM(cfg).eval()
    ref = copy.deepcopy(model)
    swap_attention(model, "flash", layers=[0])
    mask = torch.ones_like(IDS)
    mask[0, :2] = 0
    out = model(IDS, attention_mask=mask, output_attentions=loaded_with == "eager")
    want = ref(IDS, attention_mask=mask, output_attentions=loaded_with == "eager")
    real = mask.bool()  # padding positions attend to nothing: each implementation fills them its own way
    torch.testing.assert_close(out.logits[real], want.logits[real], atol=1e-5, rtol=1e-5)
    if loaded_with == "eager":
        assert len(want.attentions) == 3 and len(out.attentions) == 2  # layer 0 (flash) has no weights to give
        for got, exp in zip(out.attentions, want.attentions[1:]):
            torch.testing.assert_close(got.transpose(1, 2)[real], exp.transpose(1, 2)[real], atol=1e-6, rtol=1e-6)
        assert torch.allclose(out.attentions[0].sum(-1)[1], torch.ones(()))  # real softmax rows
    assert model.model.layers[1].self_attn.__dict__["_hf_attn_swap_base_impl"] == loaded_with
    unswap_attention(model)
    assert model.config._attn_implementation == loaded_with
    assert "_hf_attn_swap_base_impl" not in model.model.layers[1].self_attn.__dict__


# --- one INFO line per swap ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_one_info_line_per_swap(key, caplog):
    name, options = VARIANTS[key]
    model = _model(n_layers=6)
    with caplog.at_level(logging.INFO, logger="hf_attn_swap"):
        swap_attention(model, name, calibration=CALIB, **options)
        with torch.no_grad():
            model.generate(IDS, max_new_tokens=2, do_sample=False, pad_token_id=0)  # per-layer kernels report now
    lines = [r for r in caplog.records if r.name.startswith("hf_attn_swap") and r.levelno == logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert name in lines[0].getMessage() and "6 of 6 layers" in lines[0].getMessage()


def test_one_info_line_for_a_mixed_plan(caplog):
    model = _model(n_layers=6)
    with caplog.at_level(logging.INFO, logger="hf_attn_swap"):
        swap_attention(model, {"0-1": VARIANTS["flash"], "2-3": VARIANTS["gqa_fit"]}, calibration=CALIB)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hf_attn_swap") and r.levelno == logging.INFO]
    assert len(lines) == 1, lines
    assert "flash" in lines[0] and "gqa" in lines[0] and "4 of 6 layers" in lines[0] and "keep sdpa" in lines[0]
    assert kv_heads_per_layer(model) == [4, 4, 2, 2, 4, 4]


@torch.no_grad()
def test_untouched_layers_keep_flex_attention(monkeypatch):
    """A model loaded with flex_attention keeps it on untouched layers, the mask handed over as a BlockMask (flex
    compiles on first use: ~1 min on CPU, so one forward, checked against the same weights under SDPA)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**COMMON, num_key_value_heads=4, head_dim=8, attn_implementation="flex_attention", **SPECIAL)
    model = tf.LlamaForCausalLM(cfg).eval()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    swap_attention(model, "flash", layers=[0])
    assert model.model.layers[1].self_attn.__dict__["_hf_attn_swap_base_impl"] == "flex_attention"
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    real = mask.bool()
    flex, calls = AttentionInterface._global_mapping["flex_attention"], []

    def spy(module, *args, **kwargs):
        calls.append((module.layer_idx, type(args[3]).__name__))  # (layer, type of the mask it was given)
        return flex(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flex_attention", spy)
    out = model(IDS, attention_mask=mask).logits
    assert calls == [(1, "BlockMask")]  # layer 1 ran flex, layer 0 ran the swap's flash
    torch.testing.assert_close(out[real], ref(IDS, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-5)
