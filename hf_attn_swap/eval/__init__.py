"""Evaluation: perplexity, speed, KV-cache memory, passkey retrieval, and the comparison recipe's reports.

* :mod:`.perplexity` - strided sliding-window perplexity (token, bits per byte, word), every token scored once.
* :mod:`.speed` - prefill latency and cached decode tokens/s (warm-up, repeats, median, IQR; threads recorded).
* :mod:`.memory` - KV-cache bytes measured from the cache object and computed analytically; peak memory.
* :mod:`.passkey` - passkey retrieval at several lengths and depths.
* :mod:`.compare` - the comparison driver (config, run) used by ``hf-attn-swap eval`` and ``recipes/eval_ppl_speed.py``.
* :mod:`.notes` - ratios vs the baseline and the caveats that keep them honest.
* :mod:`.report` - results.json / .csv / .md and the Pareto plot.
"""

from .compare import EvalConfig, load_config, run_comparison
from .memory import KVBytes, PeakMemory, analytic_kv_bytes, kv_bytes_report, measure_kv_bytes
from .passkey import PasskeyResult, passkey_accuracy
from .perplexity import PerplexityResult, perplexity, perplexity_of_text
from .speed import Timing, decode_throughput, environment, num_threads, prefill_latency

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
