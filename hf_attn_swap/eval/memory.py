"""KV-cache bytes (measured from the cache object and computed analytically) and peak memory.

Measured: after a prefill of ``n`` tokens, every tensor held by every layer of the model's own cache object is
summed (tensors of 2+ dims; scalar counters are bookkeeping), whatever the layer type (``keys``/``values`` of transformers' layers, or any state tensors a custom cache
layer of a variant keeps, e.g. a linear-attention recurrent state). Two figures come out: ``logical`` bytes
(``numel * element_size`` of the tensors) and ``storage`` bytes (of the storages behind them, counted once each),
which differ when a layer keeps a view into a larger buffer (transformers' sliding-window layer right after prefill).

Analytic: ``sum over layers of 2 * batch * kv_heads_l * tokens_l * head_dim * dtype_bytes`` with ``tokens_l`` what
the layer's attention keeps (``n`` for full attention, the window for sliding windows), and the recurrent state's size
for linear attention; see :func:`analytic_kv_bytes`. Small bookkeeping tensors a variant's cache layer keeps beside
K/V (a per-token validity mask) are in the measured figure only.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process RSS, sampled by a background thread
(every ~2 ms) during the measured region, reported as the peak and as the increase over the start.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..hf_compat import cache_layers, layer_types_and_kwargs, output_cache


@dataclass
class KVBytes:
    """Bytes a cache holds.

    Attributes:
        total: logical bytes of all state tensors (``numel * element_size``).
        kv_only: logical bytes of the ``keys``/``values`` tensors and any recurrent state (``state_s``/``state_z`` of
            linear attention) alone: what the analytic formula counts, without bookkeeping such as validity masks.
        storage: bytes of the distinct storages behind them.
        per_layer: logical bytes per cache layer.
        layer_types: class name of every cache layer.
        seq_len: tokens the cache reports holding (layer 0).
    """

    total: int
    storage: int
    kv_only: int = 0
    per_layer: list[int] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=list)
    seq_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensors(obj: Any, depth: int = 0):
    """Tensors reachable from a cache layer's attributes (lists, tuples and dicts followed two levels deep)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)
    elif depth == 0 and hasattr(obj, "__dict__"):
        for x in vars(obj).values():
            yield from _tensors(x, depth + 1)


def measure_kv_bytes(cache: Any) -> KVBytes:
    """Bytes held by a transformers cache object (``DynamicCache`` or any ``Cache`` with ``.layers``).

    Args:
        cache: the cache a forward with ``use_cache=True`` returned. A legacy tuple of ``(k, v)`` pairs
            is accepted too.

    Raises:
        TypeError: not a cache object.
    """
    if cache_layers(cache) is not None:
        layers = list(cache_layers(cache))
    elif isinstance(cache, (list, tuple)):
        layers = list(cache)
    else:
        raise TypeError(f"expected a transformers Cache (with .layers) or a tuple of (key, value), got {type(cache).__name__}")
    per_layer: list[int] = []
    seen: set[tuple[int, int]] = set()
    storage = 0
    kv_only = 0
    for layer in layers:
        total = 0
        seen_here: set[int] = set()
        if isinstance(layer, (list, tuple)):  # legacy (key, value) pair
            named = [("keys", layer[0]), ("values", layer[1])] if len(layer) == 2 else [("", layer)]
        else:
            # Keys, values and a recurrent state are what the analytic formula counts; the rest is bookkeeping.
            named = [(name, getattr(layer, name, None)) for name in ("keys", "values", "state_s", "state_z")]
            named.append(("", layer))
        for label, t in ((lab, t) for lab, obj in named for t in _tensors(obj)):
            # dim < 2: bookkeeping (e.g. a sliding layer's int64 position counter), not cached state
            if id(t) in seen_here or t.numel() == 0 or t.dim() < 2:
                continue
            seen_here.add(id(t))
            total += t.numel() * t.element_size()
            if label:
                kv_only += t.numel() * t.element_size()
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen:
                seen.add(key)
                storage += st.nbytes()
        per_layer.append(total)
    seq_len = None
    try:
        seq_len = int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 - custom caches may not implement it; the figure is informative only
        pass
    return KVBytes(
        total=sum(per_layer),
        storage=storage,
        kv_only=kv_only,
        per_layer=per_layer,
        layer_types=[type(layer).__name__ for layer in layers],
        seq_len=seq_len,
    )


def _dtype_bytes(model: nn.Module, dtype: torch.dtype | None) -> int:
    if dtype is None:
        try:
            dtype = next(model.parameters()).dtype
        except StopIteration:
            dtype = torch.float32
    return torch.empty((), dtype=dtype).element_size()


def _window_tokens(n: int, opts: dict[str, Any]) -> int:
    # sliding_window keeps the sinks plus the last window - 1 tokens (cache_layers.KVWindowLayer)
    return min(n, int(opts.get("sinks") or 0) + int(opts["window"]) - 1)


def _linear_state_bytes(site: Any, batch: int) -> int | None:
    # S (b, H_kv, m, d) + z (b, H_kv, m), kept in fp32 whatever the model dtype (cache_layers.LinearStateLayer)
    fmap = getattr(site.module, "hf_attn_swap_feature_map", None)
    m = getattr(fmap, "feature_dim", None)
    if not isinstance(m, int):
        return None
    return batch * site.num_kv_heads * (m * site.head_dim + m) * 4


#: tokens each cache layer keeps after ``n`` tokens, by the variant swapped into the layer (None: full K/V).
#: A variant missing here gets no analytic figure (the report says so) rather than a wrong one.
KV_TOKENS_BY_VARIANT: dict[str | None, Any] = {
    None: lambda n, opts: n,
    "gqa": lambda n, opts: n,
    "mqa": lambda n, opts: n,
    "flash": lambda n, opts: n,
    "sparse": lambda n, opts: n,  # random blocks can reach anywhere: every key is kept
    "sliding_window": _window_tokens,
}


def analytic_kv_bytes(
    model: nn.Module, n: int, *, batch: int = 1, dtype: torch.dtype | None = None
) -> tuple[int | None, list[int | None]]:
    """Bytes a KV cache of ``n`` tokens should take, from the model's shapes and what each layer caches.

    Per layer: ``2 * batch * kv_heads * tokens * head_dim * dtype_bytes`` where ``tokens`` is ``n`` for full
    attention (baseline, gqa/mqa, flash, sparse), ``min(n, sinks + window - 1)`` for ``sliding_window`` (and for
    transformers' own sliding-window cache layers, ``min(n, window - 1)``); a ``linear`` layer holds its recurrent
    state ``batch * kv_heads * (m * head_dim + m)`` fp32 values (``m`` = feature size) whatever ``n``, plus, with a
    softmax ``window``, K/V of ``min(n, window - 1)`` tokens.

    Args:
        model: a model :mod:`hf_attn_swap` supports (uses :func:`hf_attn_swap.attention_sites`).
        n: tokens in the cache.
        batch: batch size.
        dtype: cache dtype (default: the model's parameter dtype).

    Returns:
        ``(total, per_layer)``; ``total`` is None if any layer has no formula (listed as None in ``per_layer``).
    """
    from ..api import attention_sites
    from ..registry import layer_swap

    sites = attention_sites(model)
    nbytes = _dtype_bytes(model, dtype)
    layer_types, kwargs = _layer_types(model, len(sites))
    per_layer: list[int | None] = []
    for site, lt, kw in zip(sites, layer_types, kwargs):
        swap = layer_swap(site.module)
        name = swap.variant if swap is not None else None
        opts = swap.config.to_dict() if swap is not None else {}
        if name == "linear":
            state = _linear_state_bytes(site, batch)
            w = int(opts.get("window") or 0)
            if state is not None and w:  # hybrid: plus the last window - 1 keys/values (cache_layers.HybridStateLayer)
                state += 2 * batch * site.num_kv_heads * min(n, w - 1) * site.head_dim * nbytes
            per_layer.append(state)
            continue
        rule = KV_TOKENS_BY_VARIANT.get(name)
        if rule is None:
            per_layer.append(None)
            continue
        tokens = rule(n, opts)
        if name is None and lt == "sliding_attention" and kw.get("sliding_window"):
            tokens = min(n, int(kw["sliding_window"]) - 1)  # transformers' DynamicSlidingWindowLayer
        elif name is None and lt != "full_attention":
            per_layer.append(None)
            continue
        per_layer.append(2 * batch * site.num_kv_heads * tokens * site.head_dim * nbytes)
    total = None if any(b is None for b in per_layer) else sum(per_layer)  # type: ignore[arg-type]
    return total, per_layer


def full_kv_bytes(model: nn.Module, n: int, *, batch: int = 1, dtype: torch.dtype | None = None) -> int:
    """``sum_l 2 * batch * kv_heads_l * n * head_dim * dtype_bytes``: a full (unwindowed) K/V cache of ``n`` tokens."""
    from ..api import attention_sites

    nbytes = _dtype_bytes(model, dtype)
    return sum(2 * batch * s.num_kv_heads * n * s.head_dim * nbytes for s in attention_sites(model))


def _layer_types(model: nn.Module, n_layers: int) -> tuple[list[str], list[dict]]:
    cfg = model.config
    try:
        types, kwargs = layer_types_and_kwargs(cfg)
        if len(types) == n_layers:
            return types, kwargs
    except Exception:  # noqa: BLE001 - older transformers or odd configs: fall back to the config fields
        pass
    window = getattr(cfg, "sliding_window", None)
    lt = "sliding_attention" if window else "full_attention"
    return [lt] * n_layers, [{"sliding_window": window}] * n_layers


@torch.no_grad()
def prefill_cache(model: nn.Module, input_ids: torch.Tensor) -> Any:
    """Run one cached forward over ``input_ids (b, n)`` and return the cache the model built itself.

    The model builds its own cache (``DynamicCache(config=model.config)``), so variants that change the cache layer
    types are measured with the cache they really use.
    """
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no cache with use_cache=True; it cannot decode incrementally")
    return cache


def kv_bytes_report(model: nn.Module, n: int, *, batch: int = 1, input_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Measure the cache after a prefill of ``n`` tokens and compare it with the analytic figures.

    Returns:
        ``kv_bytes`` (measured, logical, every state tensor), ``kv_bytes_kv_only`` (its keys/values),
        ``kv_storage_bytes``, ``kv_bytes_analytic`` (None without a formula),
        ``kv_bytes_full`` (a full K/V cache at the current KV heads), ``kv_tokens``, ``kv_batch``, ``kv_layer_types``.
    """
    device = next(model.parameters()).device
    if input_ids is None:
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=gen)
    input_ids = input_ids[:, :n].to(device)
    cache = prefill_cache(model, input_ids)
    measured = measure_kv_bytes(cache)
    analytic, _ = analytic_kv_bytes(model, n, batch=batch)
    return {
        "kv_bytes": measured.total,
        "kv_bytes_kv_only": measured.kv_only,
        "kv_storage_bytes": measured.storage,
        "kv_bytes_analytic": analytic,
        "kv_bytes_full": full_kv_bytes(model, n, batch=batch),
        "kv_tokens": n,
        "kv_batch": batch,
        "kv_layer_types": sorted(set(measured.layer_types)),
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring peak memory of a region.

    On CUDA: ``max_memory_allocated`` (reset at entry). On CPU: process RSS sampled every ``interval`` seconds by a
    daemon thread (RSS also counts the allocator's cached pages and everything else in the process, so ``delta`` is
    the meaningful figure when comparing variants).

    Attributes (after exit): ``peak`` (bytes), ``start`` (bytes), ``delta`` (``peak - start``), ``kind``
    (``"cuda_max_allocated"`` or ``"cpu_rss"``).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak = self.start = self.delta = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        self.delta = self.peak - self.start


__all__ = [
    "KVBytes",
    "PeakMemory",
    "analytic_kv_bytes",
    "full_kv_bytes",
    "kv_bytes_report",
    "measure_kv_bytes",
    "prefill_cache",
]
