"""Evaluation: perplexity, speed, KV-cache memory, passkey retrieval, and the comparison recipe's reports.

* :mod:`.perplexity` - strided sliding-window perplexity (token, bits per byte, word), every token scored once.
* :mod:`.speed` - prefill latency and cached decode tokens/s (warm-up, repeats, median, IQR; threads recorded).
* :mod:`.memory` - KV-cache bytes measured from the cache object and computed analytically; peak memory.
* :mod:`.cache_fill` - a cache filled directly to a length (random or recorded K/V, linear states): decode at 32k
  without the prefill.
* :mod:`.roofline` - bytes and FLOPs per decode step and prefill of every variant, GPU/CPU profiles, ``plan``.
* :mod:`.step_profile` - where a decode step's time goes (arithmetic, copies, Python).
* :mod:`.passkey` - passkey retrieval at several lengths and depths.
* :mod:`.config` - the comparison's typed config (torch-free: ``--help`` stays fast).
* :mod:`.compare` - the comparison run, used by ``hf-attn-swap eval`` and ``recipes/eval_ppl_speed.py``.
* :mod:`.notes` - ratios vs the baseline and the caveats that keep them honest.
* :mod:`.report` - results.json / .csv / .md and the Pareto plot.
"""

import sys
import types

# Submodules load on first use (PEP 562): ``hf_attn_swap.eval.config`` must import without torch, so that
# ``hf-attn-swap eval --help`` answers in well under a second.
_EXPORTS = {
    "EvalConfig": "config",
    "load_config": "config",
    "run_comparison": "compare",
    "KVBytes": "memory",
    "PeakMemory": "memory",
    "analytic_kv_bytes": "memory",
    "kv_bytes_report": "memory",
    "measure_kv_bytes": "memory",
    "PasskeyResult": "passkey",
    "passkey_accuracy": "passkey",
    "PerplexityResult": "perplexity",
    "perplexity": "perplexity",
    "perplexity_of_text": "perplexity",
    "fill_cache": "cache_fill",
    "record_prefill_kv": "cache_fill",
    "decode_cost": "roofline",
    "measure_cpu": "roofline",
    "model_shape": "roofline",
    "plan": "roofline",
    "prefill_cost": "roofline",
    "profile_decode_step": "step_profile",
    "Timing": "speed",
    "decode_throughput": "speed",
    "environment": "speed",
    "num_threads": "speed",
    "prefill_latency": "speed",
}


from .._lazy import lazy_exports  # noqa: E402

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


class _Package(types.ModuleType):
    # The import system binds every loaded submodule on its package; ``perplexity`` is both a submodule and the
    # function this package exports, and the function must win (as it did when this package imported eagerly).
    def __setattr__(self, name: str, value: object) -> None:
        if name == "perplexity" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "EvalConfig",
    "KVBytes",
    "PasskeyResult",
    "PeakMemory",
    "PerplexityResult",
    "Timing",
    "analytic_kv_bytes",
    "decode_throughput",
    "environment",
    "kv_bytes_report",
    "load_config",
    "measure_kv_bytes",
    "num_threads",
    "passkey_accuracy",
    "perplexity",
    "perplexity_of_text",
    "prefill_latency",
    "run_comparison",
]
