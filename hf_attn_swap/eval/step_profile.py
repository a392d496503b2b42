"""Where a decode step's time goes: the model's arithmetic, copies around it, and Python between operators.

:func:`profile_decode_step` runs a few decode steps under ``torch.profiler`` and sorts every operator's own time
(``self_cpu_time_total``) into:

* ``matmul``: the projections, the MLP and the LM head (``mm``, ``addmm``, ``bmm``, ``linear``...);
* ``attention``: the attention kernels (SDPA and its CPU kernels, ``baddbmm``, ``softmax``, this package's decode
  kernel);
* ``cache_copy``: growing or writing the cache (``cat``, ``index_copy_``);
* ``kv_copy``: copies that materialise repeated or non-contiguous K/V (``repeat_interleave``, ``clone``,
  ``contiguous``, ``copy_``, ``expand``-then-``reshape``);
* ``other_ops``: every other operator (norms, RoPE, activations, masks, argmax);
* ``python``: the step's wall time minus all operator time, i.e. Python and dispatch between operators.

A compiled step (``compile=True``, :func:`hf_attn_swap.eval.speed.compiled_forward`) is sorted the same way: its
matmuls are the prepacked GEMMs freezing leaves (``mkl::_mkl_linear``, ``mkldnn::...``), its attention the decode
operator, and ``other_ops`` is inductor's fused kernels (norms, RoPE, activations, residual adds), which the profiler
sees only as the compiled graph's own time, together with the generated code that calls them.

The profiler's own cost inflates ``python`` a little; the figures are for telling apart what dominates.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

_CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn", "aten::einsum",
               "mkl::_mkl_linear", "mkldnn::"),  # the last two: what a frozen compiled graph calls
    "attention": ("scaled_dot_product", "aten::baddbmm", "aten::softmax", "aten::_softmax", "_flash_attention",
                  "hf_attn_swap::decode_attention"),
    "cache_copy": ("aten::cat", "aten::index_copy", "aten::index_put"),
    "kv_copy": ("aten::repeat_interleave", "aten::clone", "aten::contiguous", "aten::copy_", "aten::_unsafe_view",
                "aten::repeat"),
}


def _category(name: str) -> str:
    for cat, keys in _CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other_ops"


def profile_step(step: Callable[[], Any], *, steps: int = 3, warmup: int = 1) -> dict[str, float]:
    """Milliseconds per step by category (see module docstring), plus ``wall``, over ``steps`` calls of ``step``
    after ``warmup`` unprofiled ones."""
    from torch.profiler import ProfilerActivity, profile

    if steps < 1 or warmup < 1:
        raise ValueError(f"need steps >= 1 and warmup >= 1, got steps={steps}, warmup={warmup}")
    for _ in range(warmup):  # the profile should not see first-call allocations (or a compilation)
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    out = {k: 0.0 for k in (*_CATEGORIES, "other_ops")}
    for ev in prof.key_averages():
        out[_category(ev.key)] += ev.self_cpu_time_total / 1e3 / steps
    ops = sum(out.values())
    out["python"] = max(0.0, wall - ops)
    out["wall"] = wall
    return out


@torch.no_grad()
def profile_decode_step(model: torch.nn.Module, context: int, batch: int = 1, *, steps: int = 3,
                        static: bool = False, compile: bool = False) -> dict[str, float]:  # noqa: A002
    """:func:`profile_step` of ``model``'s decode step with a cache filled to ``context`` tokens
    (:func:`hf_attn_swap.eval.cache_fill.fill_cache`; ``static``: a preallocated ``StaticCache``; ``compile``: the
    step the compiled speed measurement times, :func:`hf_attn_swap.eval.speed.compiled_forward`, which needs
    ``static``: one graph for every step)."""
    from ..hf_compat import cache_kwarg
    from .cache_fill import fill_cache
    from .speed import compiled_forward, release_compiled_graphs

    if compile and not static:
        raise ValueError("profile_decode_step: compile=True needs static=True (a dynamic cache recompiles as it grows)")

    warmup = 2 if compile else 1  # compiled: the first call compiles, a second takes any recompilation
    cache = fill_cache(model, context, batch, static_len=context + warmup + steps + 1 if static else None)
    name = cache_kwarg(model)
    gen = torch.Generator().manual_seed(context)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen).to(next(model.parameters()).device)
    forward = compiled_forward(model) if compile else model
    try:
        return profile_step(lambda: forward(input_ids=nxt, **{name: cache}, use_cache=True), steps=steps,
                            warmup=warmup)
    finally:
        if compile:  # its graph fits only this cache: free it and its frozen weights (release_compiled_graphs)
            release_compiled_graphs()


__all__ = ["profile_decode_step", "profile_step"]
