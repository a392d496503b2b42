"""Fill a model's cache directly to a given length: decode can be timed at 32k tokens without a 32k prefill.

Every layer gets what its attention would have kept after ``context`` tokens, in the cache layer class the model
really uses (:mod:`hf_attn_swap.variants.cache_layers` for swapped layers, transformers' own otherwise):

* full attention (``DynamicLayer`` or a preallocated ``StaticLayer``): ``context`` keys/values;
* ``KVWindowLayer`` (sliding window): the sinks and the last ``window - 1`` keys/values, with their positions;
* ``LinearStateLayer``: the recurrent state ``S = sum phi(k) v^T``, ``z = sum phi(k)`` (fp32) of ``context`` keys;
* ``HybridStateLayer``: the last ``window - 1`` keys/values plus the state of every older key.

The keys/values are either recorded ones (``kv``: per layer the full ``(b, H_kv, context, d)`` keys and values a
real prefill produced, see :func:`record_prefill_kv`; the filled cache then decodes exactly like the real one) or
seeded random ones of the right shapes and dtype (standard normal). For a random linear state only
``min(context, 256)`` keys are drawn and the sums scaled by ``context / drawn``: the state's size and magnitude are
those of ``context`` keys without drawing them all.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: keys drawn to build a random linear-attention state (scaled to the context).
STATE_SAMPLE = 256


def own_cache_variants(model: nn.Module) -> list[str]:
    """Variants swapped into ``model`` that keep their own cache layer (these cannot use a static cache)."""
    from ..api import attention_sites
    from ..registry import layer_swap

    names = []
    for site in attention_sites(model):
        swap = layer_swap(site.module)
        if swap is not None and getattr(swap.config, "make_cache_layer", None) is not None:
            names.append(swap.variant)
    return sorted(set(names))


def new_cache(model: nn.Module, *, static_len: int | None = None) -> Any:
    """The cache the model decodes with: ``DynamicCache(config=...)`` with every swapped layer's own cache layer in
    place, or (``static_len``) a ``StaticCache`` of that many tokens.

    Raises:
        ValueError: a static cache for a model with a variant that keeps its own cache layer.
    """
    from transformers.cache_utils import DynamicCache, StaticCache

    from ..api import attention_sites
    from ..variants._common import install_cache_layer

    if static_len is not None:
        own = own_cache_variants(model)
        if own:
            raise ValueError(f"{', '.join(own)} keep their own cache layer and cannot decode with a static cache; "
                             "allowed with static: baseline, gqa, mqa, flash")
        return StaticCache(config=model.config, max_cache_len=int(static_len))
    cache = DynamicCache(config=model.config)
    for site in attention_sites(model):
        install_cache_layer(site.module, cache)
    return cache


@contextlib.contextmanager
def record_prefill_kv(model: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, every ``cache.update(k, v, layer_idx)`` a forward makes is recorded: after one prefill the
    yielded list holds each layer's keys and values (post-RoPE, ``(b, H_kv, n, d)``), in layer order.

    Use with a cache from :func:`new_cache`::

        with record_prefill_kv(model) as kv:
            model(input_ids=ids, cache=cache, use_cache=True)
    """
    from transformers.cache_utils import Cache

    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    original = Cache.update

    def update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *a: Any, **kw: Any):
        got[int(layer_idx)] = (key_states.detach().clone(), value_states.detach().clone())
        return original(self, key_states, value_states, layer_idx, *a, **kw)

    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    Cache.update = update  # type: ignore[method-assign]
    try:
        yield out
    finally:
        Cache.update = original  # type: ignore[method-assign]
        out.extend(got[i] for i in sorted(got))


def _source(kv: tuple[torch.Tensor, torch.Tensor] | None, shape: tuple[int, int, int], dtype: torch.dtype,
            device: torch.device, gen: torch.Generator) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``take(positions) -> (k, v)`` of those positions: slices of recorded K/V, or fresh seeded random ones."""
    b, h, d = shape

    def take(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kv is not None:
            idx = pos.to(kv[0].device)
            return kv[0].index_select(2, idx).contiguous(), kv[1].index_select(2, idx).contiguous()
        n = pos.numel()
        k = torch.randn(b, h, n, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        v = torch.randn(b, h, n, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return k, v

    return take


def _state(fmap: nn.Module, take: Callable, upto: int, recorded: bool, b: int, h: int, d: int, device) -> tuple:
    """``S, z`` of the keys at positions ``0..upto-1`` (a sample scaled to ``upto`` when random)."""
    m = fmap.feature_dim
    if upto <= 0:
        return torch.zeros(b, h, m, d, device=device), torch.zeros(b, h, m, device=device)
    n = upto if recorded else min(upto, STATE_SAMPLE)
    k, v = take(torch.arange(n))
    k_feat = fmap(k, "k").float()
    s = torch.einsum("bhnm,bhnd->bhmd", k_feat, v.float())
    z = k_feat.sum(2)
    if n != upto:
        s, z = s * (upto / n), z * (upto / n)
    return s, z


def _window_positions(context: int, window: int, sinks: int) -> torch.Tensor:
    # what KVWindowLayer._trim keeps: the sinks, then the last window - 1 positions
    n_sink = min(sinks, context)
    if n_sink + window - 1 >= context:
        return torch.arange(context)
    return torch.cat([torch.arange(n_sink), torch.arange(context - (window - 1), context)])


@torch.no_grad()
def fill_cache(
    model: nn.Module,
    context: int,
    batch: int = 1,
    *,
    kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    seed: int = 0,
    static_len: int | None = None,
) -> Any:
    """A cache holding what ``model``'s layers keep after ``context`` tokens of ``batch`` sequences.

    Args:
        model: a causal LM (swapped or not).
        context: tokens already seen.
        batch: sequences.
        kv: recorded keys/values per layer (:func:`record_prefill_kv`), each ``(batch, H_kv, context, d)``; None:
            seeded random ones.
        seed: for the random keys/values.
        static_len: build a ``StaticCache`` of this many tokens (``> context``: room for the decode steps).

    Returns:
        The filled cache, ready for ``model(input_ids=next_ids, cache=...)``.
    """
    from transformers.cache_utils import DynamicLayer, StaticLayer

    from ..api import attention_sites
    from ..variants.cache_layers import HybridStateLayer, KVWindowLayer, LinearStateLayer
    from ..variants.linear import FEATURE_MAP_ATTR

    if context < 1 or batch < 1:
        raise ValueError(f"need context >= 1 and batch >= 1, got context={context}, batch={batch}")
    if static_len is not None and static_len <= context:
        raise ValueError(f"static_len={static_len} leaves no room to decode after {context} tokens")
    sites = attention_sites(model)
    if kv is not None and len(kv) != len(sites):
        raise ValueError(f"kv has {len(kv)} layers, the model {len(sites)}")
    ref = next(model.parameters())
    dtype, device = ref.dtype, ref.device
    cache = new_cache(model, static_len=static_len)
    gen = torch.Generator().manual_seed(seed)
    for i, site in enumerate(sites):
        layer = cache.layers[i]
        h, d = site.num_kv_heads, site.head_dim
        rec = kv[i] if kv is not None else None
        if rec is not None and tuple(rec[0].shape) != (batch, h, context, d):
            raise ValueError(f"recorded keys of layer {i} have shape {tuple(rec[0].shape)}, expected "
                             f"{(batch, h, context, d)}")
        take = _source(rec, (batch, h, d), dtype, device, gen)
        if isinstance(layer, HybridStateLayer):
            pos = _window_positions(context, layer.window, 0)
            _fill_window(layer, take, pos, context, batch)
            layer.state_s, layer.state_z = _state(getattr(site.module, FEATURE_MAP_ATTR), take,
                                                  context - layer.window + 1, rec is not None, batch, h, d, device)
            layer.state_upto = max(context - layer.window + 1, 0)
        elif isinstance(layer, KVWindowLayer):
            _fill_window(layer, take, _window_positions(context, layer.window, layer.sinks), context, batch)
        elif isinstance(layer, LinearStateLayer):
            k0, v0 = take(torch.arange(0))
            layer.lazy_initialization(k0, v0)
            layer.cumulative_length = context
            layer.state_s, layer.state_z = _state(getattr(site.module, FEATURE_MAP_ATTR), take, context,
                                                  rec is not None, batch, h, d, device)
        elif isinstance(layer, StaticLayer):
            k, v = take(torch.arange(context))
            layer.lazy_initialization(k, v)
            layer.keys[:, :, :context].copy_(k)
            layer.values[:, :, :context].copy_(v)
            layer.cumulative_length.fill_(context)
        elif type(layer) is DynamicLayer:
            k, v = take(torch.arange(context))
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:  # another transformers layer (a sliding-window one): its own update keeps what it should
            k, v = take(torch.arange(context))
            layer.update(k, v)
    return cache


def _fill_window(layer: Any, take: Callable, pos: torch.Tensor, context: int, batch: int) -> None:
    k, v = take(pos)
    layer.lazy_initialization(k, v)
    layer.keys, layer.values = k, v
    layer.positions = pos.to(layer.device)
    layer.valid = torch.ones(batch, pos.numel(), dtype=torch.bool, device=layer.device)
    layer.cumulative_length = context


__all__ = ["fill_cache", "new_cache", "own_cache_variants", "record_prefill_kv"]
