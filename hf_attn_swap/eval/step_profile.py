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

The profiler's own cost inflates ``python`` a little; the figures are for telling apart what dominates.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

_CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn", "aten::einsum"),
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


def profile_step(step: Callable[[], Any], *, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step by category (see module docstring), plus ``wall``, over ``steps`` calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step()  # warm: the profile should not see first-call allocations
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
                        static: bool = False) -> dict[str, float]:
    """:func:`profile_step` of ``model``'s decode step with a cache filled to ``context`` tokens
    (:func:`hf_attn_swap.eval.cache_fill.fill_cache`; ``static``: a preallocated ``StaticCache``)."""
    from ..hf_compat import cache_kwarg
    from .cache_fill import fill_cache

    cache = fill_cache(model, context, batch, static_len=context + steps + 2 if static else None)
    name = cache_kwarg(model)
    gen = torch.Generator().manual_seed(context)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen).to(next(model.parameters()).device)
    return profile_step(lambda: model(input_ids=nxt, **{name: cache}, use_cache=True), steps=steps)


__all__ = ["profile_decode_step", "profile_step"]
