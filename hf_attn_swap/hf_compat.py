"""Every private transformers / torch internal this package relies on, in one place.

The package hooks into transformers below its public API (attention and cache internals), and into two private torch
entry points. Each access goes through a named function here, and ``tests/test_internals.py`` checks each one against
the installed versions, so an upgrade that moves one fails a test naming the internal and the version instead of
breaking a swap somewhere downstream. Supported: transformers 5.20 onwards (the CI matrix runs the oldest and newest).

What differs between the supported transformers releases:

* transformers 5.24 renamed the cache argument of every forward from ``past_key_values`` to ``cache`` (the old name
  is deprecated until 5.40, with a warning on each call) and model outputs carry ``.cache`` instead of
  ``.past_key_values``; attention modules receive it as ``cache`` (``past_key_values`` before, ``layer_past`` in
  GPT-2 before).
* transformers 5.24 builds Gemma2 with eager attention by default (5.20: SDPA, which ignores the logit softcap).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------------
# Cache argument names (public, but renamed between supported releases)
# ------------------------------------------------------------------------------------------------------------------

#: names an attention module or decoder layer may receive the cache under, newest first.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_kwarg(model: Any) -> str:
    """The name ``model``'s forward takes the cache under: ``"cache"`` from transformers 5.24, else
    ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache a forward with ``use_cache=True`` (or ``generate()``) returned, under either name; None if none."""
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def cache_in_kwargs(kwargs: dict) -> Any:
    """The cache among a module's forward kwargs, whichever name it came under; None if none."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


# ------------------------------------------------------------------------------------------------------------------
# Attention implementation (config._attn_implementation, the "flash" substring test, num_key_value_groups)
# ------------------------------------------------------------------------------------------------------------------

#: attribute transformers' attention modules cache ``heads // kv_heads`` in (read by eager/SDPA ``repeat_kv``).
KV_GROUPS_ATTR = "num_key_value_groups"


def attn_implementation(config_or_model: Any) -> str | None:
    """The attention implementation name a model (or its config) runs: private ``config._attn_implementation``."""
    config = getattr(config_or_model, "config", config_or_model)
    return config._attn_implementation


def set_attn_implementation(model: nn.Module, name: str) -> None:
    """Select the registered attention ``name`` on ``model`` and on its top-level config.

    ``set_attn_implementation`` is public, but some models keep a copy on sub-configs or modules; masks and layers read
    the model-level private ``config._attn_implementation``, so it is written too.
    """
    model.set_attn_implementation(name)
    model.config._attn_implementation = name


def flash_attention_requested(name: str) -> bool:
    """Whether transformers treats ``name`` as a FlashAttention request (it then loads a flash kernel for it).

    transformers tests a substring (``utils.generic.is_flash_attention_requested``), which is why
    :func:`hf_attn_swap.registry.implementation_name` renames "flash" in variant names.
    """
    from transformers.utils.generic import is_flash_attention_requested

    return bool(is_flash_attention_requested(requested_attention_implementation=name))


def attention_function(config: Any, default: Callable) -> Callable:
    """The attention function transformers' own modules would call for ``config`` (``default`` for eager)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation(config), default)


def modeling_module_of(module: nn.Module, depth: int = 0) -> Any:
    """The ``modeling_*.py`` module that defines ``type(module)`` (or its ``depth``-th base class), for its private
    helpers (``apply_rotary_pos_emb``, ``eager_attention_forward``)."""
    return sys.modules[type(module).__mro__[depth].__module__]


def model_eager_attention(module: nn.Module) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` of ``module``'s own modeling file (a convention of transformers' modeling
    files, not an API: each family has its own, Gemma-2's caps logits, GPT-2's does not repeat K/V). Walks the MRO so
    a patched subclass finds its family's function; None when no file along it has one."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    return None


def module_state_lives_in_dict(module: nn.Module) -> bool:
    """Whether ``nn.Module`` keeps all of its state (parameters, submodules, buffers, hooks) in containers held in the
    instance ``__dict__`` (its private ``_parameters``/``_modules``/``_buffers``/``_forward_hooks``... dicts). The
    undo journal (:mod:`hf_attn_swap.journal`) snapshots those containers and relies on this."""
    state = vars(module)
    return all(isinstance(state.get(name), dict) for name in (
        "_parameters", "_modules", "_buffers", "_forward_hooks", "_forward_pre_hooks"))


def tensor_version(t: torch.Tensor) -> int:
    """A tensor's private in-place write counter (``Tensor._version``): it grows on every in-place write."""
    return t._version


# ------------------------------------------------------------------------------------------------------------------
# Cache layers (CacheLayerMixin subclassing, _layer_type registration, cache.layers replacement)
# ------------------------------------------------------------------------------------------------------------------


def cache_layer_mixin() -> type:
    """transformers' ``CacheLayerMixin``: subclasses with a ``_layer_type`` register themselves for
    ``config.layer_types`` (``__init_subclass__`` writes ``DYNAMIC_LAYER_TYPE_MAPPING``)."""
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


def linear_attention_cache_mixin() -> type:
    """transformers' ``LinearAttentionCacheLayerMixin`` (recurrent states per layer, present from 5.20)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return LinearAttentionCacheLayerMixin


def registered_cache_layer(layer_type: str) -> type | None:
    """The dynamic cache layer class transformers builds for ``layer_type`` (None if none is registered)."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

    return DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type)


def is_static_cache_layer(layer: Any) -> bool:
    """Whether ``layer`` is a pre-allocated (static) transformers cache layer, which cannot be replaced per layer."""
    from transformers.cache_utils import StaticLayer

    return isinstance(layer, StaticLayer)


def cache_layers(cache: Any) -> list | None:
    """The per-layer list of a transformers ``Cache`` (replaced in place by the variants), or None for another kind
    of cache (a legacy tuple)."""
    return getattr(cache, "layers", None)


def new_cache_layer(cache: Any) -> Any:
    """A fresh layer of the class a lazily built ``DynamicCache`` appends (``layer_class_to_replicate``); None if the
    cache does not build layers lazily."""
    cls = getattr(cache, "layer_class_to_replicate", None)
    return cls() if cls is not None else None


def layer_types_and_kwargs(config: Any) -> tuple[list[str], list[dict]]:
    """The cache layer type and constructor kwargs of each decoder layer, as ``DynamicCache(config=...)`` builds them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return list(types), list(kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Model construction
# ------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_init_weights() -> Iterator[None]:
    """Build a model without running its weight initialisation (the weights are loaded right after)."""
    from transformers.initialization import no_init_weights as _no_init

    with _no_init():
        yield


# ------------------------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------------------------

#: whether ``F.scaled_dot_product_attention`` takes ``enable_gqa`` (torch >= 2.5); read off the signature text
#: because the function is a C builtin without an inspectable signature.
SDPA_HAS_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


def cpu_flash_lse_available() -> bool:
    """Whether torch's private CPU flash-attention op (output plus log-sum-exp) exists (torch >= 2.3)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def cpu_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's private CPU flash kernel: ``(out (b, h, q, d), lse (b, h, q))``; the public SDPA drops the lse."""
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
    )
    return out[0], out[1]


def forward_hook_tables(module: nn.Module) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """``nn.Module``'s private hook tables: ``((pre_hooks, pre_hooks_with_kwargs), (hooks, hooks_with_kwargs))``.

    torch has no public way to find or remove a hook by its function, which deep-copied models need (their handles
    point at the original's tables).
    """
    return (
        (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
        (module._forward_hooks, module._forward_hooks_with_kwargs),
    )


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints that transformers 4.x (and tools pinned to it, e.g. llama.cpp's GGUF converter) can load
# ------------------------------------------------------------------------------------------------------------------

#: tokenizer classes transformers 5 writes that 4.x does not have, and the 4.x class reading the same files.
#: ``TokenizersBackend`` is 5.x's generic ``tokenizer.json`` class; 5.x keeps ``PreTrainedTokenizerFast`` as its alias.
V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_v4_loadable(path: str | Path) -> list[str]:
    """Rewrite a saved directory so transformers 4.x loads it as 5.x does; 5.x loading is unchanged.

    * ``tokenizer_config.json``: a 5.x-only ``tokenizer_class`` becomes the 4.x class that reads the same
      ``tokenizer.json`` (only when that file is there).
    * ``config.json``: 5.x keeps the RoPE base in ``rope_parameters``; 4.x reads ``rope_theta`` (and ``rope_scaling``)
      at the top level and silently falls back to its default base without them. The flat (one RoPE for every layer)
      form is copied up; 5.x ignores the copies when ``rope_parameters`` is present.

    Args:
        path: a directory written by ``save_pretrained``.

    Returns:
        The names of the files changed.
    """
    path = Path(path)
    changed = []
    tok_file = path / "tokenizer_config.json"
    if tok_file.is_file() and (path / "tokenizer.json").is_file():
        tok = json.loads(tok_file.read_text())
        portable = V5_ONLY_TOKENIZER_CLASSES.get(tok.get("tokenizer_class"))
        if portable:
            tok["tokenizer_class"] = portable
            tok_file.write_text(json.dumps(tok, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            changed.append(tok_file.name)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
            cfg["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
                cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            changed.append(cfg_file.name)
    if changed:
        logger.debug("made %s loadable by transformers 4.x (%s)", path, ", ".join(changed))
    return changed
