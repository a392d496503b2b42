"""Each private transformers / torch internal the package relies on (all reached through hf_attn_swap/hf_compat.py)
still exists and behaves as relied on. A failure names the internal and the installed versions: fix hf_compat.py (or
the caller it names), do not loosen the test."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache

from hf_attn_swap import hf_compat
from hf_attn_swap.registry import implementation_name
from hf_attn_swap.variants.cache_layers import HybridStateLayer, KVWindowLayer, LinearStateLayer
from tests.tiny_models import tiny

VERSIONS = f"transformers {transformers.__version__}, torch {torch.__version__}"


def moved(internal: str, what: str) -> str:
    return f"{VERSIONS}: internal `{internal}` moved or changed: {what} (used through hf_attn_swap/hf_compat.py)"


# --------------------------------------------------------------------------------- attention implementation


def test_config_attn_implementation_is_read_and_written_model_wide():
    model = tiny("llama")
    assert hf_compat.attn_implementation(model) == model.config._attn_implementation == "sdpa", moved(
        "PreTrainedConfig._attn_implementation", "tiny llama does not report 'sdpa'"
    )
    hf_compat.set_attn_implementation(model, "eager")
    attn = model.model.layers[0].self_attn
    assert attn.config._attn_implementation == "eager", moved(
        "config._attn_implementation", "attention modules no longer share the model-level config"
    )


def test_flash_substring_test_and_the_rename_that_avoids_it():
    assert hf_compat.flash_attention_requested("my_flash_variant"), moved(
        "utils.generic.is_flash_attention_requested", "no longer a substring test (registry.implementation_name "
        "renames 'flash' because of it: the rename may now be unneeded)"
    )
    assert not hf_compat.flash_attention_requested(implementation_name("flash")), moved(
        "utils.generic.is_flash_attention_requested", "treats the renamed variant as a flash request"
    )


def test_attention_function_lookup():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def default(*a, **k):  # pragma: no cover - never called
        raise AssertionError

    model = tiny("llama")
    assert hf_compat.attention_function(model.config, default) is sdpa_attention_forward, moved(
        "ALL_ATTENTION_FUNCTIONS.get_interface", "'sdpa' does not resolve to sdpa_attention_forward"
    )
    hf_compat.set_attn_implementation(model, "eager")
    assert hf_compat.attention_function(model.config, default) is default, moved(
        "ALL_ATTENTION_FUNCTIONS.get_interface", "'eager' does not fall back to the module's default"
    )


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_reads_num_key_value_groups_from_the_module(impl):
    # GQA conversion rewrites module.num_key_value_groups; transformers' attention must read it per call.
    model = tiny("llama")
    attn = model.model.layers[0].self_attn
    assert getattr(attn, hf_compat.KV_GROUPS_ATTR) == 2, moved(hf_compat.KV_GROUPS_ATTR, "not cached on the module")
    hf_compat.set_attn_implementation(model, impl)
    fn = hf_compat.attention_function(model.config, hf_compat.modeling_module_of(attn).eager_attention_forward)
    q = torch.randn(1, 8, 5, 8)
    k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    setattr(attn, hf_compat.KV_GROUPS_ATTR, 8)
    out, _ = fn(attn, q, k, v, None, scaling=8**-0.5, dropout=0.0, is_causal=False)
    ref = F.scaled_dot_product_attention(q, k.expand(1, 8, 5, 8), v.expand(1, 8, 5, 8)).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6), moved(f"{impl} attention + {hf_compat.KV_GROUPS_ATTR}", "wrong output")


def test_modeling_module_helpers_of_gpt_neox():
    model = tiny("gpt_neox")
    attn = model.gpt_neox.layers[0].attention
    neox = hf_compat.modeling_module_of(attn)
    for name in ("apply_rotary_pos_emb", "eager_attention_forward"):
        assert callable(getattr(neox, name, None)), moved(f"{neox.__name__}.{name}", "missing")


def test_gpt_neox_forward_the_patch_copies_is_unchanged():
    # convert/patches.py replaces GPTNeoXAttention.forward with a block-layout copy: its signature and attributes must
    # still be the ones the copy uses, and with the fused weight re-laid out as [Q | K | V] it must give the same output.
    from hf_attn_swap.convert.patches import patched_class

    model = tiny("gpt_neox")
    attn = model.gpt_neox.layers[0].attention
    params = list(inspect.signature(type(attn).forward).parameters)
    assert params == ["self", "hidden_states", "attention_mask", "layer_past", "position_embeddings", "kwargs"], moved(
        "GPTNeoXAttention.forward", f"signature is now {params}"
    )
    for name in ("query_key_value", "dense", "head_size", "scaling", "attention_dropout", "layer_idx", "config"):
        assert hasattr(attn, name), moved(f"GPTNeoXAttention.{name}", "missing")
    x = torch.randn(2, 6, model.config.hidden_size)
    pos = torch.arange(6)[None].expand(2, 6)
    rope = model.gpt_neox.rotary_emb(x, pos)
    with torch.no_grad():
        ref, _ = attn(x, None, position_embeddings=rope)
        h, hs = model.config.num_attention_heads, attn.head_size
        w = attn.query_key_value.weight.view(h, 3, hs, -1).transpose(0, 1).reshape(3 * h * hs, -1)
        b = attn.query_key_value.bias.view(h, 3, hs).transpose(0, 1).reshape(-1)
        attn.query_key_value.weight.copy_(w)
        attn.query_key_value.bias.copy_(b)
        attn.__class__ = patched_class(attn, "gpt_neox")
        out, _ = attn(x, None, position_embeddings=rope)
    assert torch.allclose(out, ref, atol=1e-5), moved("GPTNeoXAttention.forward", "the patched copy now differs")


# --------------------------------------------------------------------------------- cache layers


def test_cache_layer_mixin_abstract_methods_are_implemented():
    mixin = hf_compat.cache_layer_mixin()
    missing = {
        cls.__name__: sorted(getattr(cls, "__abstractmethods__", set()))
        for cls in (KVWindowLayer, LinearStateLayer, HybridStateLayer)
        if getattr(cls, "__abstractmethods__", set())
    }
    assert not missing, moved("cache_utils.CacheLayerMixin", f"new abstract methods not implemented: {missing}")
    assert issubclass(KVWindowLayer, mixin)


def test_layer_type_subclasses_register_for_config_layer_types():
    for cls in (KVWindowLayer, LinearStateLayer, HybridStateLayer):
        assert hf_compat.registered_cache_layer(cls._layer_type) is cls, moved(
            "CacheLayerMixin.__init_subclass__ / DYNAMIC_LAYER_TYPE_MAPPING", f"{cls._layer_type} not registered"
        )
    config = tiny("llama").config
    config.layer_types = ["hf_attn_swap_kv", "hf_attn_swap_linear"]
    cache = DynamicCache(config=config)
    assert [type(layer) for layer in hf_compat.cache_layers(cache)] == [KVWindowLayer, LinearStateLayer], moved(
        "DynamicCache(config=...)", "does not build the registered layer types"
    )


def test_cache_layers_are_a_replaceable_list_and_grow_lazily():
    cache = DynamicCache()
    layers = hf_compat.cache_layers(cache)
    assert isinstance(layers, list), moved("Cache.layers", f"is {type(layers).__name__}, not a list")
    fresh = hf_compat.new_cache_layer(cache)
    assert isinstance(fresh, hf_compat.cache_layer_mixin()), moved("Cache.layer_class_to_replicate", "gone")
    layers.append(LinearStateLayer())
    k = torch.randn(1, 2, 3, 4)
    cache.update(k, k, 0)
    assert cache.get_seq_length() == 3, moved("Cache.update / get_seq_length", "do not go through .layers[i]")


def test_static_cache_layers_are_recognised():
    from transformers.cache_utils import StaticLayer

    assert hf_compat.is_static_cache_layer(StaticLayer(max_cache_len=4))
    assert not hf_compat.is_static_cache_layer(KVWindowLayer())


def test_layer_types_and_kwargs_of_a_sliding_model():
    config = tiny("mistral").config
    config.sliding_window = 16
    types, kwargs = hf_compat.layer_types_and_kwargs(config)
    assert types == ["sliding_attention"] * config.num_hidden_layers, moved(
        "cache_utils.get_layer_types_and_kwargs", f"types {types}"
    )
    assert all(kw.get("sliding_window") == 16 for kw in kwargs), moved(
        "cache_utils.get_layer_types_and_kwargs", f"kwargs {kwargs}"
    )


def test_linear_state_lives_in_transformers_linear_attention_state():
    mixin = hf_compat.linear_attention_cache_mixin()
    assert issubclass(LinearStateLayer, mixin) and issubclass(HybridStateLayer, mixin)
    layer = LinearStateLayer()
    cache = DynamicCache()
    hf_compat.cache_layers(cache).append(layer)
    k = torch.randn(2, 1, 3, 4)
    cache.update(k, k, 0)
    assert not cache.has_previous_state(0), moved("Cache.has_previous_state", "true before any state")
    s, z = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4)
    cache.update_recurrent_state(s, 0, state_idx=0)  # transformers' write path lands in our state_s ...
    layer.state_z = z  # ... and ours in its recurrent_states
    assert layer.state_s is s and layer.recurrent_states[1] is z, moved(
        "LinearAttentionCacheLayerMixin.recurrent_states / Cache.update_recurrent_state", "not our (S, z)"
    )
    if hasattr(cache, "get_recurrent_state"):  # read API from transformers 5.24
        assert cache.get_recurrent_state(0, 0) is s and cache.get_recurrent_state(0, 1) is z
    assert cache.has_previous_state(0), moved("LinearAttentionCacheLayerMixin.has_previous_state", "not tracked")
    # still sized like a full layer for the mask builders (see cache_layers' docstring)
    assert cache.get_seq_length() == 3 and cache.get_mask_sizes(2, 0) == (5, 0), moved(
        "Cache.get_seq_length / get_mask_sizes", "skip our linear layer (transformers' own linear layers have no length)"
    )
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.state_s, s.flip(0)) and torch.equal(layer.state_z, z.flip(0))
    layer.reset()
    assert layer.state_s is None and layer.get_seq_length() == 0


# --------------------------------------------------------------------------------- model construction


def test_no_init_weights_skips_initialisation():
    t = torch.zeros(8)
    with hf_compat.no_init_weights():
        torch.nn.init.normal_(t)
    assert not t.any(), moved("transformers.initialization.no_init_weights", "initialisation still runs inside it")
    torch.nn.init.normal_(t)
    assert t.any(), moved("transformers.initialization.no_init_weights", "initialisation stays off after it")


# --------------------------------------------------------------------------------- cache argument names


def test_cache_argument_and_output_names():
    model = tiny("llama")
    name = hf_compat.cache_kwarg(model)
    assert name in inspect.signature(model.forward).parameters
    out = model(torch.tensor([[3, 4, 5]]), use_cache=True)
    cache = hf_compat.output_cache(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3, moved("model output cache", "not found")


# --------------------------------------------------------------------------------- torch


def test_sdpa_gqa_flag_matches_torch():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    try:
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        accepts = True
    except TypeError:
        accepts = False
    assert hf_compat.SDPA_HAS_GQA == accepts, moved("F.scaled_dot_product_attention.__doc__", "enable_gqa detection")


def test_cpu_flash_op_returns_output_and_log_sum_exp():
    assert hf_compat.cpu_flash_lse_available(), moved("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu", "gone")
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out, lse = hf_compat.cpu_flash_attention(q, k, v, attn_mask=None, scale=0.5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.5), atol=1e-5), moved(
        "aten._scaled_dot_product_flash_attention_for_cpu", "output differs from SDPA"
    )
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.5, -1), atol=1e-5), moved(
        "aten._scaled_dot_product_flash_attention_for_cpu", "second output is not the log-sum-exp"
    )


def test_forward_hook_tables():
    module = torch.nn.Linear(2, 2)

    def pre(mod, args, kwargs):
        return None

    def post(mod, args, kwargs, out):
        return None

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    (pre_hooks, pre_kw), (hooks, hooks_kw) = hf_compat.forward_hook_tables(module)
    assert pre_hooks[h1.id] is pre and h1.id in pre_kw, moved("nn.Module._forward_pre_hooks(_with_kwargs)", "layout")
    assert hooks[h2.id] is post and h2.id in hooks_kw, moved("nn.Module._forward_hooks(_with_kwargs)", "layout")


def test_eager_attention_function_of_a_modeling_file():
    model = tiny("gemma2")
    attn = model.model.layers[0].self_attn
    from transformers.models.gemma2 import modeling_gemma2

    assert hf_compat.model_eager_attention(attn) is modeling_gemma2.eager_attention_forward, moved(
        "modeling_*.eager_attention_forward", "Gemma-2's modeling file no longer defines it (untouched eager layers of a "
        "per-layer swap run it: base_attention.py)"
    )
    assert hf_compat.model_eager_attention(torch.nn.Linear(2, 2)) is None


def test_module_state_and_tensor_version_counter():
    module = torch.nn.Linear(2, 2)
    assert hf_compat.module_state_lives_in_dict(module), moved(
        "nn.Module._parameters/_modules/_buffers/_forward_hooks", "no longer dicts in the instance __dict__ (the "
        "swap journal snapshots them: journal.py)"
    )
    before = hf_compat.tensor_version(module.weight)
    with torch.no_grad():
        module.weight.add_(1.0)
    assert hf_compat.tensor_version(module.weight) > before, moved("Tensor._version", "no longer grows on in-place writes")
