"""Prefill latency and cached decode throughput, measured with warm-up, repeats, median and spread.

* Prefill: one forward over a prompt of ``n`` tokens with ``use_cache=True`` and ``logits_to_keep=1`` (what
  ``generate()`` runs for the prompt), building the model's own cache; timed ``repeats`` times after ``warmup``.
* Decode: prefill a context of ``c`` tokens (untimed), then greedy single-token steps through the cache, as
  ``generate()`` does; every step is timed on its own after ``warmup`` steps. ``tokens/s = batch / step time``.
  The context grows by ``warmup + steps`` tokens during the measurement (small against ``c``).

Several models are timed round-robin (:func:`compare_speed`): every repeat of every prefill length, and every decode
step, visits each model in turn (the starting model rotating), so a change of machine load during the measurement
hits all of them alike instead of biasing the ratios of whichever model ran in a busy minute. On a shared CPU this
matters more than anything else: a sequential run on this project's 2-core box once showed every variant "1.8x
faster" than a baseline measured while other jobs ran.

On GPU every timed region is bracketed by ``torch.cuda.synchronize``. Every result records device, dtype and the
thread count (:func:`environment`). On a shared or small CPU, use one thread (:func:`num_threads`) for stable ratios.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..hf_compat import cache_kwarg, output_cache
from ..progress import progress as progress_bar

logger = logging.getLogger(__name__)


@dataclass
class Timing:
    """Summary of repeated timings, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    n: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        if not samples_ms:
            raise ValueError("no timing samples")
        s = sorted(samples_ms)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(statistics.median(s), q1, q3, s[0], s[-1], len(s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, device: torch.device | str = "cpu") -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (CUDA-synchronised on GPU)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(samples)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Set ``torch.set_num_threads(n)`` inside the block (None: leave as is); yields the count in effect."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be a positive integer, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def environment(model: nn.Module) -> dict[str, Any]:
    """Device, dtype, threads and versions: recorded with every measurement."""
    import transformers

    device = _device(model)
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    return env


def _ids(model: nn.Module, batch: int, n: int, input_ids: torch.Tensor | None) -> torch.Tensor:
    """``(batch, n)`` prompt ids: a window of ``input_ids`` (1-D real text) if long enough, else seeded random ids."""
    device = _device(model)
    if input_ids is not None and input_ids.numel() >= n:
        row = input_ids.reshape(-1)[:n]
        return row.unsqueeze(0).expand(batch, n).contiguous().to(device)
    gen = torch.Generator().manual_seed(1234 + n)
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=gen).to(device)


def _batch_sizes_ok(cache: Any, batch: int) -> bool:
    from .memory import _tensors

    for layer in getattr(cache, "layers", []):
        for t in _tensors(layer):
            if t.dim() >= 2 and t.numel() and t.shape[0] != batch:
                return False
    return True


@torch.no_grad()
def _prefilled(model: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Cache and next tokens after a prefill of ``ids (b, c)``; a batch of identical rows is prefilled once and the
    cache repeated along the batch (checked on every state tensor; otherwise the full batch is prefilled)."""
    b = ids.shape[0]
    if b > 1 and bool((ids == ids[:1]).all()):
        out = model(input_ids=ids[:1], use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        try:
            cache.batch_repeat_interleave(b)
            if _batch_sizes_ok(cache, b):
                return cache, out.logits[:, -1].argmax(-1, keepdim=True).expand(b, 1).contiguous()
        except Exception as err:  # noqa: BLE001 - a custom cache layer without batch repeat: do it the slow way
            logger.debug("cache batch repeat failed (%s); prefilling the whole batch", err)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def _filled(model: nn.Module, context: int, batch: int, static_len: int | None) -> tuple[Any, torch.Tensor]:
    """A cache filled directly to ``context`` tokens (seeded random K/V) and seeded random next tokens."""
    from .cache_fill import fill_cache

    cache = fill_cache(model, context, batch, seed=context + batch, static_len=static_len)
    gen = torch.Generator().manual_seed(context)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen).to(_device(model))
    return cache, nxt


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes a measurement may still allocate: free GPU memory, or the system's available memory on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_cache_fits(
    models: dict[str, nn.Module],
    contexts: Sequence[int],
    batch_sizes: Sequence[int],
    *,
    static: bool = False,
    extra_tokens: int = 0,
    available: int | None = None,
) -> None:
    """Refuse, before anything is allocated, a (context, batch) cell whose caches do not fit.

    A cell keeps the caches of every model at once (they are timed round-robin); each is sized with
    :func:`hf_attn_swap.eval.memory.analytic_kv_bytes` at ``context + extra_tokens`` tokens (a full cache when the
    variant has no formula, or when ``static``), plus its largest layer (a dynamic step's concatenation holds one
    layer twice), plus 10%.

    Raises:
        ValueError: the largest cell that does not fit, what it needs and what is available.
    """
    from .memory import analytic_kv_bytes, full_kv_bytes

    if not models or not contexts or not batch_sizes:
        return
    have = available_memory(_device(next(iter(models.values())))) if available is None else available
    for c in sorted(contexts, reverse=True):
        for b in sorted(batch_sizes, reverse=True):
            n = int(c) + extra_tokens
            need = 0
            for m in models.values():
                total, per_layer = analytic_kv_bytes(m, n, batch=int(b))
                if static or total is None:
                    total, per_layer = full_kv_bytes(m, n, batch=int(b)), [0]
                # a DynamicCache step concatenates one layer at a time: that layer exists twice for a moment
                need += total + max((x or 0) for x in per_layer)
            need = int(need * 1.1)
            if need > have:
                raise ValueError(
                    f"context {c} x batch {b} does not fit: the caches of {len(models)} model(s) need "
                    f"{need / 1e9:.2f} GB (+10%) and {have / 1e9:.2f} GB is available; allowed: smaller contexts or "
                    "batches, or fewer models per run")


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _rotation(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


@torch.no_grad()
def compare_speed(
    models: dict[str, nn.Module],
    *,
    prefill_lengths: Sequence[int] = (),
    prefill_batch: int = 1,
    decode_contexts: Sequence[int] = (),
    decode_batch_sizes: Sequence[int] = (1,),
    steps: int = 16,
    warmup: int = 1,
    decode_warmup: int = 2,
    repeats: int = 3,
    input_ids: torch.Tensor | None = None,
    fill: str = "prefill",
    cache: str = "dynamic",
    compile: bool = False,  # noqa: A002 - the option's name everywhere else
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], dict[str, str]]:
    """Prefill latency and cached decode speed of several models, measured round-robin.

    Args:
        models: ``{name: model}``; all take the same input ids (same tokenizer / vocabulary).
        prefill_lengths: prompt lengths timed for prefill.
        prefill_batch: prompts per prefill.
        decode_contexts: cache lengths when decode timing starts.
        decode_batch_sizes: sequences decoded together.
        steps: timed single-token decode steps per cell (each step one sample).
        warmup: untimed prefill calls per model and length.
        decode_warmup: untimed decode steps per model and cell.
        repeats: timed prefill calls per model and length.
        input_ids: optional 1-D real-text ids to take prompts from (else seeded random ids).
        fill: how the decode cache gets its context: ``prefill`` (a real forward over the prompt) or ``random``
            (filled directly to the length with seeded random keys/values of the right shapes,
            :func:`hf_attn_swap.eval.cache_fill.fill_cache`: contexts up to 32k without their prefill). With
            ``random`` the caches of every model of a cell must fit in the memory available, checked before
            anything is timed.
        cache: ``dynamic`` (transformers' ``DynamicCache``, variants' own layers) or ``static`` (a preallocated
            ``StaticCache`` written in place: no per-step concatenation; only for variants without their own cache
            layer, needs ``fill="random"``).
        compile: time a ``torch.compile``-d forward (with ``cache="static"``: one graph for every step; on a CPU with
            inductor's ``freezing``, weights as prepacked constants). After each (context, batch) cell every
            compiled graph of the process is freed (:func:`release_compiled_graphs`).

    Returns:
        ``(results, errors)``: ``results[name] = {"prefill": [...], "decode": [...]}`` with the cells of
        :func:`prefill_latency` and :func:`decode_throughput`; ``errors[name]`` the first exception a model raised
        (it is then dropped from the rotation, the others go on).
    """
    from .memory import measure_kv_bytes

    if steps < 1 or repeats < 1 or warmup < 0 or decode_warmup < 0:
        raise ValueError(f"need steps >= 1, repeats >= 1, warmups >= 0; got steps={steps}, repeats={repeats}, "
                         f"warmup={warmup}, decode_warmup={decode_warmup}")
    if not models:
        raise ValueError("no model to time")
    if fill not in ("prefill", "random") or cache not in ("dynamic", "static"):
        raise ValueError(f"fill must be prefill or random, cache dynamic or static; got fill={fill!r}, cache={cache!r}")
    if cache == "static" and fill != "random":
        raise ValueError("cache='static' needs fill='random' (the static cache is filled directly)")
    static_len = (lambda c: int(c) + decode_warmup + steps + 1) if cache == "static" else (lambda c: None)
    if fill == "random":
        check_cache_fits(models, decode_contexts, decode_batch_sizes, static=cache == "static",
                         extra_tokens=decode_warmup + steps + 1)
    names = list(models)
    first = models[names[0]]
    device = _device(first)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {"prefill": [], "decode": []} for n in names}
    errors: dict[str, str] = {}

    def alive(order: list[str]) -> list[str]:
        return [n for n in order if n not in errors]

    def guard(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - one failing model must not stop the others' measurement
            errors[name] = f"{type(err).__name__}: {err}"
            logger.error("speed measurement of %s failed: %s", name, errors[name])
            return None

    for m in models.values():
        m.eval()
    # One unit = one round over every model: a warm-up, a timed repeat or step, or the untimed prefill of a decode cell.
    # Closed at the end only: guard() turns a model's failure into a record, so nothing below is expected to raise.
    cells = len(decode_contexts) * len(decode_batch_sizes)
    bar = progress_bar(desc=f"timing {len(names)} model(s) round-robin", unit="round",
                       total=len(prefill_lengths) * (warmup + repeats) + cells * (1 + decode_warmup + steps))
    for n_tok in prefill_lengths:
        ids = _ids(first, prefill_batch, int(n_tok), input_ids)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for name in alive(names):
            model = models[name]
            for _ in range(warmup):
                guard(name, lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
        bar.update(warmup)
        gc.collect()
        for r in range(repeats):
            for name in alive(_rotation(names, r)):
                model = models[name]
                t = guard(name, lambda: _timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), device))
                if t is not None:
                    samples[name].append(t)
            bar.update(1)
        for name in alive(names):
            t = Timing.of(samples[name])
            results[name]["prefill"].append({"length": int(n_tok), "batch": prefill_batch, **t.to_dict(),
                                             "tokens_per_s": prefill_batch * n_tok / (t.median_ms / 1e3)})

    cache_names = {name: cache_kwarg(m) for name, m in models.items()}  # not inside the timed step
    forwards: dict[str, Callable[..., Any]] = {
        name: compiled_forward(m) if compile else m for name, m in models.items()}
    for c in decode_contexts:
        for b in decode_batch_sizes:
            ids = _ids(first, int(b), int(c), input_ids) if fill == "prefill" else None  # random: no prompt at all
            state: dict[str, list[Any]] = {}
            kv: dict[str, Any] = {}
            for name in alive(names):
                if fill == "random":
                    got = guard(name, lambda: _filled(models[name], int(c), int(b), static_len(c)))
                else:
                    got = guard(name, lambda: _prefilled(models[name], ids))
                if got is not None:
                    state[name] = list(got)
                    kv[name] = measure_kv_bytes(got[0])  # the cache decode starts from: measured for free
            bar.update(1)

            def step(name: str) -> None:
                cache, nxt = state[name]
                logits = forwards[name](input_ids=nxt, **{cache_names[name]: cache}, use_cache=True).logits
                state[name][1] = logits[:, -1].argmax(-1, keepdim=True)

            for name in alive(names):
                for _ in range(decode_warmup):
                    guard(name, lambda: step(name))
            bar.update(decode_warmup)
            gc.collect()
            samples = {n: [] for n in names}
            for i in range(steps):
                for name in alive(_rotation(names, i)):
                    t = guard(name, lambda: _timed(lambda: step(name), device))
                    if t is not None:
                        samples[name].append(t)
                bar.update(1)
            for name in alive(names):
                t = Timing.of(samples[name])
                k = kv[name]
                results[name]["decode"].append({
                    "context": int(c),
                    "batch": int(b),
                    **t.to_dict(),
                    "tokens_per_s": b / (t.median_ms / 1e3),
                    "tokens_per_s_q1": b / (t.q3_ms / 1e3),
                    "tokens_per_s_q3": b / (t.q1_ms / 1e3),
                    "kv_bytes": k.total,
                    "kv_bytes_kv_only": k.kv_only,
                    "kv_storage_bytes": k.storage,
                    "kv_layer_types": sorted(set(k.layer_types)),
                    "fill": fill,
                    "cache": cache,
                    "compiled": bool(compile),
                })
            state.clear()  # free the caches before the next cell
            if compile:  # and this cell's graphs: the next cell's shapes compile their own
                release_compiled_graphs()
            gc.collect()
    bar.close()
    return results, errors


#: Graphs torch.compile may keep per compiled function during a timed or profiled run: one per (model, batch, cache
#: length) cell. Dynamo's default (8) is reached by a few variants x batches, after which it silently runs the
#: function eagerly (seen: a profile of "compiled" MQA steps that were eager, 22 ms of Python a step).
COMPILED_GRAPHS_LIMIT = 256


def compiled_forward(model: nn.Module) -> Callable[..., Any]:
    """``torch.compile(model, dynamic=False)``, each call under the settings a measurement needs.

    * On a CPU, inductor's ``freezing``: the weights become constants of the graph, which inductor prepacks for the
      CPU GEMM: a decode step's matmuls are (batch x hidden) by a whole weight matrix, where the unpacked GEMM streams
      the weights at about half the memory rate (SmolLM2 MQA at 8k x 8, one thread: 213 -> 181 ms a step). Sound for
      what calls this: timed or profiled inference, never training. Costs a packed copy of the weights while the
      compiled model lives. Set around every call because graphs compile at their first call (and on a recompile),
      and ``torch.compile(options={"freezing": True})`` does not reach the freezing pass (measured: no speed-up).
    * Dynamo's recompile limit raised to :data:`COMPILED_GRAPHS_LIMIT`, and reaching it an error, not a silent
      fall-back to eager code: a figure labelled compiled must be of a compiled step.
    """
    import torch._dynamo.config as dynamo_config

    forward = torch.compile(model, dynamic=False)
    # recompile_limit is the newer name of cache_size_limit (one setting: patching either changes both)
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    dynamo = {limit: COMPILED_GRAPHS_LIMIT}
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):  # older torch: no such switch, the raised limit remains
        dynamo["fail_on_recompile_limit_hit"] = True
    settings = [(dynamo_config, dynamo)]
    if _device(model).type == "cpu":
        import torch._inductor.config as inductor_config  # not an attribute of torch until something imports it

        settings.append((inductor_config, {"freezing": True}))

    def call(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for config, values in settings:
                stack.enter_context(config.patch(**values))
            return forward(*args, **kwargs)

    return call


def release_compiled_graphs() -> None:
    """Free the graphs ``torch.compile`` holds in this process (all but the latest, below), with the weight copies
    freezing baked into them.

    A frozen graph keeps its weights (and their prepacked copies) as globals of the module inductor generated, and
    inductor keeps each such module in ``sys.modules`` and in its own code cache for the life of the process:
    ``torch.compiler.reset()`` alone frees none of it. A compiled measurement compiles a graph per (model, batch,
    cache length) cell, so without this a grid grows by about two copies of the weights a cell (SmolLM2: ~1 GB); a
    grid at 8k x 1 had used 20 of 24 GiB, and the larger cells would have been skipped as not fitting. Called
    between cells, when that cell's graphs can never run again: what stays is the most recent graph, which torch
    itself holds on to until the next compilation (measured: one graph's copies, however many cells). Every other
    compiled function of the process compiles anew at its next call.
    """
    torch.compiler.reset()
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:  # no inductor: nothing of it to free
        return
    loaded = getattr(PyCodeCache, "modules", None)  # inductor's own list of the modules it generated and loaded
    if loaded is None:
        logger.warning("release_compiled_graphs: this torch's inductor keeps no PyCodeCache.modules; compiled "
                       "graphs' weights stay in memory until the process ends")
        return
    for mod in list(loaded):
        if sys.modules.get(mod.__name__) is mod:
            del sys.modules[mod.__name__]
    PyCodeCache.cache_clear()
    gc.collect()


def _one(model: nn.Module, **kw: Any) -> dict[str, list[dict[str, Any]]]:
    results, errors = compare_speed({"model": model}, **kw)
    if errors:
        raise RuntimeError(errors["model"])
    return results["model"]


def prefill_latency(
    model: nn.Module,
    lengths: Sequence[int],
    *,
    batch: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    input_ids: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Prefill latency of one model at several prompt lengths.

    Args:
        model: a causal LM.
        lengths: prompt lengths in tokens.
        batch: prompts per forward.
        warmup: untimed calls per length.
        repeats: timed calls per length.
        input_ids: optional 1-D real-text ids to take prompts from (else seeded random ids).

    Returns:
        One dict per length: ``length``, ``batch``, ``median_ms``, ``q1_ms``, ``q3_ms``, ``min_ms``, ``max_ms``,
        ``n``, ``tokens_per_s`` (``batch * length / median``).
    """
    return _one(model, prefill_lengths=lengths, prefill_batch=batch, warmup=warmup, repeats=repeats,
                input_ids=input_ids)["prefill"]


def decode_throughput(
    model: nn.Module,
    contexts: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    *,
    steps: int = 16,
    warmup: int = 2,
    input_ids: torch.Tensor | None = None,
    fill: str = "prefill",
    cache: str = "dynamic",
    compile: bool = False,  # noqa: A002
) -> list[dict[str, Any]]:
    """Greedy cached decoding speed of one model at several context lengths and batch sizes.

    Args:
        model: a causal LM whose forward returns a cache with ``use_cache=True``.
        contexts: tokens already in the cache when timing starts.
        batch_sizes: sequences decoded together.
        steps: timed single-token steps per cell (each is one sample).
        warmup: untimed steps first.
        input_ids: optional 1-D real-text ids for the context (else seeded random ids).
        fill, cache, compile: see :func:`compare_speed` (``fill="random"``: the cache filled directly, no prefill).

    Returns:
        One dict per (context, batch): ``context``, ``batch``, step-time statistics in ms, ``tokens_per_s``
        (``batch / median step``), ``tokens_per_s_q1``/``_q3`` (from the step-time quartiles), and the bytes of the
        cache right after the prefill (``kv_bytes``, ``kv_bytes_kv_only``, ``kv_storage_bytes``; see
        :func:`hf_attn_swap.eval.memory.measure_kv_bytes`).
    """
    return _one(model, decode_contexts=contexts, decode_batch_sizes=batch_sizes, steps=steps, decode_warmup=warmup,
                input_ids=input_ids, fill=fill, cache=cache, compile=compile)["decode"]


__all__ = ["COMPILED_GRAPHS_LIMIT", "Timing", "available_memory", "check_cache_fits", "compare_speed", "compiled_forward",
           "decode_throughput", "environment", "num_threads", "prefill_latency", "release_compiled_graphs", "time_fn"]
