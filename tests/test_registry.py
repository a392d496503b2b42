"""Registry contract: every variant is wired into both transformers hooks; custom variants; per-layer plans."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import output, tiny
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hf_attn_swap import (
    VariantConfig,
    get_variant,
    layer_swap,
    list_variants,
    register_variant,
    swap_attention,
    swap_record,
    unswap_attention,
)
from hf_attn_swap.api import parse_layers
from hf_attn_swap.registry import DISPATCHER_NAME, _REGISTRY

IDS = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))


@dataclass
class ScaleConfig(VariantConfig):
    factor: float = 1.0


def _scaled(module, query, key, value, attention_mask, scaling=None, **kw):
    cfg = layer_swap(module).config
    scale = (scaling or query.shape[-1] ** -0.5) * cfg.factor
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2), None


@pytest.fixture(scope="module", autouse=True)
def scaled_variant():
    register_variant("test_scaled", _scaled, config=ScaleConfig, overwrite=True)
    yield
    _REGISTRY.pop("test_scaled", None)


@pytest.mark.parametrize("name", list_variants())
def test_every_variant_is_registered_in_both_transformers_hooks(name):
    spec = get_variant(name)
    impl = spec.impl_name
    assert "/" not in impl and ":" not in impl and "flash" not in impl  # names transformers would hijack
    assert AttentionInterface._global_mapping[impl] is spec.attention_fn
    # Without a mask function transformers silently drops causality and padding: it must be there too.
    assert AttentionMaskInterface._global_mapping[impl] is spec.mask_fn
    assert issubclass(spec.config_cls, VariantConfig) and spec.config_cls.variant == name
    spec.config_cls.from_dict({}).to_json()  # defaults are valid and serialisable


def test_dispatcher_is_registered_with_a_mask():
    assert DISPATCHER_NAME in AttentionInterface._global_mapping
    assert DISPATCHER_NAME in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("bad", ["a/b", "a:b", "", "paged_x", "sdpa", "flash_attention_2"])
def test_invalid_names_are_refused(bad):
    with pytest.raises(ValueError):
        register_variant(bad, _scaled)


def test_double_registration_needs_overwrite():
    with pytest.raises(ValueError, match="already registered"):
        register_variant("test_scaled", _scaled, config=ScaleConfig)


def test_attention_only_swap_keeps_causality_and_undoes_exactly():
    model = tiny("llama")
    ref = output(model, IDS)
    swap_attention(model, "test_scaled", factor=1.0)
    assert model.config._attn_implementation == "test_scaled"
    torch.testing.assert_close(output(model, IDS), ref, atol=1e-5, rtol=1e-5)  # same math as SDPA, fp32
    # Causality: changing the last token never changes earlier outputs.
    ids2 = IDS.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 100
    assert torch.equal(output(model, ids2)[:, :-1], output(model, IDS)[:, :-1])
    unswap_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(output(model, IDS), ref)
    assert swap_record(model) is None
    assert all(layer_swap(layer.self_attn) is None for layer in model.model.layers)


def test_per_layer_plan_uses_the_dispatcher_and_records_each_layer():
    model = tiny("llama")
    ref = output(model, IDS)
    swap_attention(model, {"0": ("test_scaled", {"factor": 0.5}), 1: ("gqa", {"groups": 4})})
    # Two different variants: one registered dispatcher reads each module's LayerSwap.
    assert model.config._attn_implementation == DISPATCHER_NAME
    assert layer_swap(model.model.layers[0].self_attn).config.factor == 0.5
    assert layer_swap(model.model.layers[1].self_attn).variant == "gqa"
    out = output(model, IDS)
    assert not torch.allclose(out, ref, atol=1e-3)  # layer 0 really runs with factor 0.5
    gen = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 13)
    model2 = tiny("llama")
    swap_attention(model2, "test_scaled", factor=0.5, layers=[0])  # same thing through layers=
    assert model2.config._attn_implementation == DISPATCHER_NAME  # layer 1 untouched: SDPA through the dispatcher
    torch.testing.assert_close(output(model2, IDS), out, atol=1e-6, rtol=1e-6)
    model3 = tiny("llama")
    swap_attention(model3, {"0": ("test_scaled", {"factor": 0.5}), 1: ScaleConfig(factor=1.0)})
    assert model3.config._attn_implementation == "test_scaled"  # one variant, per-layer options
    torch.testing.assert_close(output(model3, IDS), out, atol=1e-6, rtol=1e-6)
    assert [s.layers for s in swap_record(model).steps] == [[0], [1]]


def test_plan_with_overlapping_layers_is_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match="assigned twice"):
        swap_attention(model, {"0-1": "test_scaled", 1: "test_scaled"})
    assert model.config._attn_implementation == "sdpa"


def test_gqa_then_attention_variant_stack_and_undo_refuses():
    model = tiny("llama")
    swap_attention(model, "gqa", groups=2)
    swap_attention(model, "test_scaled", factor=1.0)
    assert [s.variant for s in swap_record(model).steps] == ["gqa", "test_scaled"]
    assert torch.isfinite(output(model, IDS)).all()
    with pytest.raises(ValueError, match="cannot undo gqa"):
        unswap_attention(model)


@pytest.mark.parametrize(
    "spec, expected",
    [(None, [0, 1, 2, 3]), (2, [2]), (-1, [3]), ("0-1,3", [0, 1, 3]), ("2-", [2, 3]), (range(1, 3), [1, 2]),
     (slice(None, None, 2), [0, 2]), ([3, 1], [1, 3])],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", [4, "x", "1-z", [], [1.5], True])
def test_parse_layers_rejects(spec):
    with pytest.raises(ValueError, match="layer"):
        parse_layers(spec, 4)


def test_custom_variant_example_runs(smollm2):
    """The example in examples/custom_variant.py registers and swaps a real model."""
    path = Path(__file__).parents[1] / "examples" / "custom_variant.py"
    spec = importlib.util.spec_from_file_location("custom_variant_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import copy

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        swap_attention(model, "temperature_sdpa", temperature=1.0)
        same = model(ids).logits
        unswap_attention(model)
    torch.testing.assert_close(same, before, atol=1e-4, rtol=1e-4)  # temperature 1 == SDPA (fp32, 30 layers)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        swap_attention(model, "temperature_sdpa", temperature=0)


def test_registering_with_another_variants_config_class_leaves_that_class_alone():
    """register_variant("my_gqa", config=GQAConfig) used to rewrite GQAConfig.variant: GQAConfig(...) objects then
    ran my_gqa and skipped gqa's weight conversion."""
    from hf_attn_swap import GQAConfig, kv_heads_per_layer
    from hf_attn_swap.variants.gqa import grouped_attention

    spec = register_variant("test_my_gqa", grouped_attention, config=GQAConfig, overwrite=True)
    try:
        assert GQAConfig.variant == "gqa" and get_variant("gqa").config_cls is GQAConfig
        assert spec.config_cls is not GQAConfig and issubclass(spec.config_cls, GQAConfig)
        assert spec.config_cls.variant == "test_my_gqa"
        model = tiny("llama")
        swap_attention(model, GQAConfig(groups=2))
        assert kv_heads_per_layer(model) == [2, 2]  # weights converted: gqa ran
        assert swap_record(model).steps[0].variant == "gqa"
        other = tiny("llama")
        swap_attention(other, "test_my_gqa", groups=2)  # the new variant gets its own (derived) options class
        assert swap_record(other).steps[0].variant == "test_my_gqa" and kv_heads_per_layer(other) == [4, 4]
        assert type(layer_swap(other.model.layers[0].self_attn).config) is spec.config_cls
    finally:
        _REGISTRY.pop("test_my_gqa", None)
    # Re-registering a name with the class it already owns keeps that class (the fixture above relies on it).
    again = register_variant("test_scaled", _scaled, config=ScaleConfig, overwrite=True)
    assert again.config_cls is ScaleConfig and ScaleConfig.variant == "test_scaled"


def test_variants_without_options_do_not_share_a_class():
    """Option-less variants used to write their name into the one shared NoOptions class: the last one won."""
    from hf_attn_swap.configs import NoOptions

    a = register_variant("test_plain_a", _unit_scaled, overwrite=True)
    b = register_variant("test_plain_b", _unit_scaled, overwrite=True)
    try:
        assert NoOptions.variant == ""
        assert a.config_cls is not b.config_cls and (a.config_cls.variant, b.config_cls.variant) == (
            "test_plain_a", "test_plain_b")
        model = tiny("llama")
        swap_attention(model, "test_plain_a")
        assert swap_record(model).steps[0].variant == "test_plain_a"
        assert model.config._attn_implementation == "test_plain_a"
    finally:
        _REGISTRY.pop("test_plain_a", None)
        _REGISTRY.pop("test_plain_b", None)


def _unit_scaled(module, query, key, value, attention_mask, scaling=None, **kw):
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2), None


def test_variants_do_not_import_the_api():
    """The registry imports the variants; a variant importing hf_attn_swap.api (which imports the registry) closes
    an import circle. Variants walk the model through hf_attn_swap.convert instead."""
    import ast

    root = Path(__file__).parents[1] / "hf_attn_swap" / "variants"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and (node.module or "").split(".")[0] == "api":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
