"""What the sliding-window, linear and sparse variants share: where keys sit, which are padding, and their cache.

Three facts shape this module (see ``shared/notes/transformers-hooks.md``):

* An attention function never sees the cache (``cache``; ``past_key_values`` before transformers 5.24). These
  variants keep their own cache layer (a bounded window, a recurrent state, or keys with their positions), so a
  forward pre-hook on each swapped attention module hands the cache over and, on first use, replaces that layer's transformers cache layer with the variant's own. Masks and cache
  therefore change together, whatever ``config.layer_types`` says (Gemma-3 keys its RoPE and masks by layer type, so
  ``config`` is left alone).
* The model-level mask is shared by every layer of a per-layer plan and its key columns need not be positions (a
  Gemma-3 sliding layer gets a windowed mask sized by another cache layer). Only one thing is read from it: whether
  each NEW token is padding, from the diagonal of its last ``q`` columns (``mask[b, 0, r, kv - q + r]``), which is
  right for causal, windowed and bidirectional SDPA masks alike. The cache layer remembers that validity per key.
* Positions are cache indices (0 = the first slot, padding included), as Mistral's window uses them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..convert.adapters import get_adapter
from ..convert.projections import AttentionSite, find_attention
from ..hf_compat import (
    SDPA_HAS_GQA,
    cache_in_kwargs,
    cache_layers,
    forward_hook_tables,
    is_static_cache_layer,
    new_cache_layer,
)
from ..registry import layer_swap

#: attribute on an attention module holding the cache handed over by the pre-hook for the current forward.
CACHE_ATTR = "_hf_attn_swap_cache"

_REFERENCE_MODE = False


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Within this context every variant of this package computes through :mod:`hf_attn_swap.reference` (dense,
    fp32) with the same positions and padding: the oracle of model-level tests."""
    global _REFERENCE_MODE
    old, _REFERENCE_MODE = _REFERENCE_MODE, True
    try:
        yield
    finally:
        _REFERENCE_MODE = old


def in_reference_mode() -> bool:
    return _REFERENCE_MODE


def grouped_kv(key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """K/V and SDPA keyword arguments for ``heads`` query heads: ``enable_gqa`` where torch has it (no copy), else
    the heads repeated (torch < 2.5, the only option there)."""
    group = heads // key.shape[1]
    if group == 1:
        return key, value, {}
    if SDPA_HAS_GQA:
        return key, value, {"enable_gqa": True}
    return key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1), {}


def new_token_validity(attention_mask: torch.Tensor | None, batch: int, q_len: int, device) -> torch.Tensor:
    """``(b, q)`` bool: False where the new token is padding (read off the mask diagonal of its last ``q`` columns)."""
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    m = attention_mask
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2  # additive 0 / -inf float mask
    kv = m.shape[-1]
    diag = m[:, 0, :, kv - q_len :].diagonal(dim1=-2, dim2=-1)  # (b|1, q)
    return diag.expand(batch, q_len).to(device)


def _self_attention_cache(cache: Any) -> Any:
    # GPT-2 and encoder-decoders wrap the self-attention cache.
    return getattr(cache, "self_attention_cache", cache)


def _stash_cache_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = cache_in_kwargs(kwargs)
    cache = _self_attention_cache(cache) if cache is not None else None
    if cache is not None:
        install_cache_layer(module, cache)
    module.__dict__[CACHE_ATTR] = cache


def _clear_cache_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module.__dict__[CACHE_ATTR] = None


def install_cache_layer(module: nn.Module, cache: Any) -> None:
    """Put the variant's own cache layer at ``module.layer_idx`` of ``cache`` (once per cache)."""
    swap = layer_swap(module)
    factory = getattr(getattr(swap, "config", None), "make_cache_layer", None)
    if factory is None:
        return
    idx = int(module.layer_idx)
    layers = cache_layers(cache)
    if layers is None:
        raise ValueError(
            f"the {swap.variant} attention keeps its own cache layer and needs a transformers Cache with per-layer "
            f"`layers` (DynamicCache); got {type(cache).__name__}"
        )
    while len(layers) <= idx:  # lazily built DynamicCache
        fresh = new_cache_layer(cache)
        if fresh is None:
            raise ValueError(f"cache has {len(layers)} layers, layer {idx} is missing")
        layers.append(fresh)
    current = layers[idx]
    wanted = factory()
    if type(current) is type(wanted) and current.signature() == wanted.signature():
        return
    if current.get_seq_length() > 0:
        raise ValueError(
            f"layer {idx} runs {swap.variant} but the cache passed in already holds {current.get_seq_length()} "
            f"tokens in a {type(current).__name__}; start generation with a fresh cache (none, or "
            "DynamicCache(config=model.config))"
        )
    if is_static_cache_layer(current):
        raise ValueError(
            f"{swap.variant} keeps its own cache layer and cannot use a static cache; use the default dynamic cache "
            "(do not pass cache_implementation='static')"
        )
    layers[idx] = wanted


def current_cache_layer(module: nn.Module) -> Any | None:
    """The variant's cache layer for this forward (after the module's ``update``), or None without a cache."""
    cache = module.__dict__.get(CACHE_ATTR)
    if cache is None:
        return None
    return cache_layers(cache)[int(module.layer_idx)]


def add_cache_hooks(module: nn.Module) -> None:
    """Register the cache hand-over hooks on ``module`` (idempotent)."""
    if any(fn is _stash_cache_hook for fn in forward_hook_tables(module)[0][0].values()):
        return
    module.register_forward_pre_hook(_stash_cache_hook, with_kwargs=True)
    module.register_forward_hook(_clear_cache_hook, with_kwargs=True)


def remove_cache_hooks(module: nn.Module) -> None:
    """Remove the hooks added by :func:`add_cache_hooks` (found by identity, so deep copies work too)."""
    for hooks, extra in forward_hook_tables(module):
        for key, fn in list(hooks.items()):
            if fn in (_stash_cache_hook, _clear_cache_hook):
                del hooks[key]
                extra.pop(key, None)
    module.__dict__.pop(CACHE_ATTR, None)


def swap_config(module: nn.Module, expected_cls: type) -> Any:
    """The per-layer config of ``module`` (its :class:`LayerSwap`); a clear error if the module was not swapped."""
    swap = layer_swap(module)
    cfg = getattr(swap, "config", None)
    if not isinstance(cfg, expected_cls):
        raise RuntimeError(
            f"attention module {type(module).__name__} carries no {expected_cls.__name__}; use swap_attention(...) "
            "rather than setting attn_implementation by hand"
        )
    return cfg


def model_sites(model: nn.Module) -> list[AttentionSite]:
    """The model's attention modules in layer order. Variants walk the model through :mod:`..convert` (like the
    conversion code), never through :mod:`..api`, which imports the registry that imports the variants."""
    return find_attention(model, get_adapter(model))


def attention_sites_of(model: nn.Module, layers: list[int]) -> list[nn.Module]:
    """The attention modules of ``layers``."""
    sites = model_sites(model)
    return [sites[i].module for i in layers]


def require_causal(model: nn.Module, variant: str) -> None:
    """Causal-LM-only variants refuse encoder models, naming the alternatives."""
    adapter = get_adapter(model)
    if not adapter.causal:
        raise ValueError(
            f"{variant} is a causal (decoder) attention and {adapter.model_type!r} is a bidirectional encoder; "
            "allowed here: flash, sparse (bidirectional BigBird pattern), gqa, mqa"
        )
