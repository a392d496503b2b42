"""Attention-variant benchmarks: every ratio of issue 3 measured side by side in one run.

    python bench/variants.py --threads 1 --out results/variants

Times are medians of ``--repeats`` runs after one warm-up, of the attention operation alone (fp32, CPU, batch 1
unless stated). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.llama.modeling_llama import eager_attention_forward

from hf_attn_swap.eval.report import provenance_lines
from hf_attn_swap.provenance import provenance
from hf_attn_swap.variants import band_cpu
from hf_attn_swap.variants.blocked import blocked_local_attention
from hf_attn_swap.variants.feature_maps import FeatureMap
from hf_attn_swap.variants.gqa import grouped_attention
from hf_attn_swap.variants.linear import chunked_linear_attention

RENDERER = "bench/variants.py:markdown"  # how hf_attn_swap.readme re-renders and checks the .md


def timeit(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(fns: dict, repeats: int, spread: dict | None = None) -> dict:
    """Median seconds of each function, calls alternating between them so that drift in machine load (other
    processes) hits all of them alike. One warm-up call each. ``spread`` (if given) receives each one's quartiles."""
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    if spread is not None and repeats >= 2:
        for k, v in times.items():
            q = statistics.quantiles(v, n=4)
            spread[k] = [q[0], q[2]]
    return {k: statistics.median(v) for k, v in times.items()}


class _Mod(torch.nn.Module):
    def __init__(self, h: int, h_kv: int):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = h // h_kv
        self.training = False


def bench_sliding(repeats: int, n: int = 8192, window: int = 512, h: int = 4, d: int = 64) -> dict:
    """Full causal SDPA vs sliding window, at ``h`` heads (MHA) and at SmolLM2-135M's GQA shape (9 query heads over
    3 KV heads): the band kernel (the default path, also with 4 sinks) and the SDPA blocks it replaces where it cannot
    run (no C compiler, no AVX2, autograd)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    q9 = torch.randn(1, 9, n, d, generator=g)
    k3, v3 = torch.randn(1, 3, n, d, generator=g), torch.randn(1, 3, n, d, generator=g)

    def window_attn(q, k, v, sinks=0, kernel=True):
        with contextlib.nullcontext() if kernel else band_cpu.off():
            return blocked_local_attention(q, k, v, q_start=0, n_sink=0, tail_start=0, window=window, sinks=sinks)

    fns = {
        "full_causal_sdpa_s": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "kernel_s": lambda: window_attn(q, k, v),
        "kernel_sinks4_s": lambda: window_attn(q, k, v, sinks=4),
        "sdpa_blocks_s": lambda: window_attn(q, k, v, kernel=False),
        "gqa9x3_full_causal_sdpa_s": lambda: F.scaled_dot_product_attention(q9, k3, v3, is_causal=True,
                                                                            enable_gqa=True),
        "gqa9x3_kernel_s": lambda: window_attn(q9, k3, v3),
        "gqa9x3_sdpa_blocks_s": lambda: window_attn(q9, k3, v3, kernel=False),
    }
    spread: dict = {}
    res = {"n": n, "window": window, "heads": h, "head_dim": d, "kernel_built": band_cpu.available(),
           **timeit_interleaved(fns, repeats, spread)}
    res["quartiles_s"] = spread
    for key in ("kernel", "kernel_sinks4", "sdpa_blocks"):
        res[f"speedup_{key}"] = res["full_causal_sdpa_s"] / res[f"{key}_s"]
        if key != "kernel_sinks4":
            res[f"speedup_gqa9x3_{key}"] = res["gqa9x3_full_causal_sdpa_s"] / res[f"gqa9x3_{key}_s"]
    return res


def bench_linear(repeats: int, h: int = 8, d: int = 64) -> dict:
    fm = FeatureMap("elu", h, h, d, d, 0)
    g = torch.Generator().manual_seed(0)
    res = {"heads": h, "head_dim": d, "feature_map": "elu", "chunk_size": 64}
    # Prefill scaling (interleaved).
    fns = {}
    for n in (4096, 8192):
        q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
        fns[f"prefill_{n}_s"] = (lambda q=q, k=k, v=v: chunked_linear_attention(fm(q, "q"), fm(k, "k"), v))
    res.update(timeit_interleaved(fns, repeats))
    res["prefill_ratio_8k_over_4k"] = res["prefill_8192_s"] / res["prefill_4096_s"]
    # Decode per token at context 512 and 16384: one token through the recurrent state (linear) vs one token over a
    # K/V cache of that length (softmax SDPA). Interleaved calls, median of repeats * 100.
    fns = {}
    q1, k1, v1 = (torch.randn(1, h, 1, d, generator=g) for _ in range(3))
    for ctx in (512, 16384):
        k, v = torch.randn(1, h, ctx, d, generator=g), torch.randn(1, h, ctx, d, generator=g)
        with torch.no_grad():
            _, s, z = chunked_linear_attention(fm(k, "q"), fm(k, "k"), v)
        kc, vc = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        fns[f"decode_linear_ctx{ctx}_s"] = (lambda s=s, z=z: chunked_linear_attention(fm(q1, "q"), fm(k1, "k"), v1, s, z))
        fns[f"decode_softmax_ctx{ctx}_s"] = (lambda kc=kc, vc=vc: F.scaled_dot_product_attention(q1, kc, vc))
    res.update(timeit_interleaved(fns, repeats * 100))
    res["decode_linear_ratio_16k_over_512"] = res["decode_linear_ctx16384_s"] / res["decode_linear_ctx512_s"]
    res["decode_softmax_ratio_16k_over_512"] = res["decode_softmax_ctx16384_s"] / res["decode_softmax_ctx512_s"]
    return res


def bench_flash(repeats: int, n: int = 2048, h: int = 8, d: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    mod = _Mod(h, h)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    add = torch.zeros(n, n).masked_fill(~mask, float("-inf"))[None, None]

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return grouped_attention(mod, q, k, v, None, scaling=d**-0.5)

    t = timeit_interleaved({"eager": lambda: eager_attention_forward(mod, q, k, v, add, scaling=d**-0.5),
                            "flash": flash}, repeats)
    eager, fl = t["eager"], t["flash"]
    return {"n": n, "heads": h, "head_dim": d, "eager_s": eager, "sdpa_flash_s": fl, "speedup": eager / fl}


def bench_grouped_decode(repeats: int, b: int = 4, ctx: int = 2048, h: int = 9, d: int = 64) -> dict:
    """SmolLM2-135M attention shapes (9 query heads, head size 64): GQA-3 (its own) and MQA, one decode token."""
    g = torch.Generator().manual_seed(0)
    res = {"batch": b, "context": ctx, "heads": h, "head_dim": d}
    q = torch.randn(b, h, 1, d, generator=g)
    fns = {}
    for name, h_kv in (("gqa3", 3), ("mqa", 1)):
        k, v = torch.randn(b, h_kv, ctx, d, generator=g), torch.randn(b, h_kv, ctx, d, generator=g)
        mod = _Mod(h, h_kv)

        def repeated(k=k, v=v, h_kv=h_kv):
            kr, vr = repeat_kv(k, h // h_kv), repeat_kv(v, h // h_kv)
            return F.scaled_dot_product_attention(q, kr, vr)

        fns[f"{name}_repeat_kv_s"] = repeated
        fns[f"{name}_grouped_s"] = (lambda k=k, v=v, mod=mod: grouped_attention(mod, q, k, v, None))
        res[f"{name}_kv_bytes"] = 2 * k.numel() * k.element_size()
    res.update(timeit_interleaved(fns, repeats * 30))
    for name in ("gqa3", "mqa"):
        res[f"{name}_grouped_speedup_vs_repeat_kv"] = res[f"{name}_repeat_kv_s"] / res[f"{name}_grouped_s"]
    res["kv_bytes_ratio_gqa3_over_mqa"] = res["gqa3_kv_bytes"] / res["mqa_kv_bytes"]
    res["speed_ratio_mqa_over_gqa3"] = res["gqa3_grouped_s"] / res["mqa_grouped_s"]
    res["speed_ratio_over_bytes_ratio"] = res["speed_ratio_mqa_over_gqa3"] / res["kv_bytes_ratio_gqa3_over_mqa"]
    return res


def markdown(r: dict) -> str:
    """The report, from the JSON alone (``python -m hf_attn_swap.readme`` re-renders and checks it)."""
    s, li, fl, gq = r["sliding_window"], r["linear"], r["flash"], r["grouped_decode"]
    ok = lambda c: "yes" if c else "NO"  # noqa: E731
    q_ = s.get("quartiles_s", {})
    iqr = lambda k: (f" (IQR {q_[k][0]*1e3:.0f}-{q_[k][1]*1e3:.0f})" if k in q_ else "")  # noqa: E731
    lines = [
        "# Attention-variant benchmarks (issue 3)",
        "",
        f"Command: `{r.get('command', 'not recorded')}`",
        "",
        f"torch {r['torch']}, transformers {r['transformers']}, {r['threads']} thread(s), CPU: {r['cpu']}{_load(r)}, "
        f"fp32. Times: median of {r['repeats']} runs (decode steps: x30 / x100 calls) after one warm-up, calls of each comparison "
        f"interleaved, attention op only. Inputs are seeded random tensors (seed 0) at the stated shapes: no model "
        "weights are loaded, so there is no weights hash to record.",
        "",
        "| benchmark | measured | goal | met |",
        "|---|---|---|---|",
        f"| sliding window w={s['window']}, n={s['n']} ({s['heads']} heads, d={s['head_dim']}): full causal SDPA "
        f"{s['full_causal_sdpa_s']*1e3:.0f} ms{iqr('full_causal_sdpa_s')} vs band kernel "
        f"{s['kernel_s']*1e3:.0f} ms{iqr('kernel_s')} / with 4 sinks {s['kernel_sinks4_s']*1e3:.0f} ms / SDPA blocks "
        f"(fallback) {s['sdpa_blocks_s']*1e3:.0f} ms{iqr('sdpa_blocks_s')} "
        f"| **{s['speedup_kernel']:.1f}x** / {s['speedup_kernel_sinks4']:.1f}x / {s['speedup_sdpa_blocks']:.1f}x "
        f"| >= 6x (ideal ~8x) | {ok(s['speedup_kernel'] >= 6)} |",
        f"| same at SmolLM2's GQA shape (9 query / 3 KV heads): full causal SDPA (enable_gqa) "
        f"{s['gqa9x3_full_causal_sdpa_s']*1e3:.0f} ms vs band kernel {s['gqa9x3_kernel_s']*1e3:.0f} ms / SDPA blocks "
        f"{s['gqa9x3_sdpa_blocks_s']*1e3:.0f} ms | **{s['speedup_gqa9x3_kernel']:.1f}x** / "
        f"{s['speedup_gqa9x3_sdpa_blocks']:.1f}x | >= 6x | {ok(s['speedup_gqa9x3_kernel'] >= 6)} |",
        f"| linear decode per token, ctx 16384 vs 512 (elu, {li['heads']} heads): "
        f"{li['decode_linear_ctx16384_s']*1e6:.0f} us vs {li['decode_linear_ctx512_s']*1e6:.0f} us; softmax SDPA "
        f"{li['decode_softmax_ctx16384_s']*1e6:.0f} us vs {li['decode_softmax_ctx512_s']*1e6:.0f} us "
        f"| linear {li['decode_linear_ratio_16k_over_512']:.2f}x, softmax {li['decode_softmax_ratio_16k_over_512']:.1f}x "
        f"| linear <= 1.2x | {ok(li['decode_linear_ratio_16k_over_512'] <= 1.2)} |",
        f"| linear prefill 8k vs 4k: {li['prefill_8192_s']*1e3:.0f} ms vs {li['prefill_4096_s']*1e3:.0f} ms "
        f"| {li['prefill_ratio_8k_over_4k']:.2f} | <= 2.3 | {ok(li['prefill_ratio_8k_over_4k'] <= 2.3)} |",
        f"| flash (CPU SDPA flash) vs eager, n={fl['n']} causal: {fl['sdpa_flash_s']*1e3:.0f} ms vs "
        f"{fl['eager_s']*1e3:.0f} ms | {fl['speedup']:.1f}x | >= 3x | {ok(fl['speedup'] >= 3)} |",
        f"| grouped decode vs repeat_kv, batch {gq['batch']}, ctx {gq['context']}, SmolLM2 shapes: GQA-3 "
        f"{gq['gqa3_grouped_s']*1e6:.0f} vs {gq['gqa3_repeat_kv_s']*1e6:.0f} us, MQA {gq['mqa_grouped_s']*1e6:.0f} vs "
        f"{gq['mqa_repeat_kv_s']*1e6:.0f} us | GQA-3 {gq['gqa3_grouped_speedup_vs_repeat_kv']:.2f}x, MQA "
        f"{gq['mqa_grouped_speedup_vs_repeat_kv']:.2f}x | faster | "
        f"{ok(gq['gqa3_grouped_speedup_vs_repeat_kv'] > 1 and gq['mqa_grouped_speedup_vs_repeat_kv'] > 1)} |",
        f"| MQA/GQA-3 decode speed ratio vs KV-bytes ratio ({gq['kv_bytes_ratio_gqa3_over_mqa']:.0f}x) "
        f"| {gq['speed_ratio_mqa_over_gqa3']:.2f}x = {gq['speed_ratio_over_bytes_ratio']:.2f} of it | >= 0.9 of it "
        f"| {ok(gq['speed_ratio_over_bytes_ratio'] >= 0.9)} |",
        "",
        "How the band kernel and the SDPA-blocks fallback work: `hf_attn_swap/variants/band_cpu.c` and "
        "`hf_attn_swap/variants/blocked.py`.",
        "",
    ]
    if "gpu" in r:  # recorded since provenance; older runs did not say
        lines += [f"GPU: {r['gpu']} (not used: every figure above is a CPU path)." if r["gpu"] else
                  "GPU: none visible to torch in this run; flash_attn (FlashAttention-2) and fla kernels were not "
                  "measured.", ""]
    if r.get("provenance"):
        lines += provenance_lines(r["provenance"])
    return "\n".join(lines).rstrip("\n") + "\n"


def _load(r: dict) -> str:
    load = (r.get("provenance") or {}).get("load_average")
    return f" (load average {load[0]} at the end)" if load else ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/variants")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    results = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "repeats": args.repeats,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name, fn in (("flash", bench_flash), ("grouped_decode", bench_grouped_decode), ("linear", bench_linear),
                     ("sliding_window", bench_sliding)):
        results[name] = fn(args.repeats)
        print(name, json.dumps(results[name], indent=None), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results["provenance"] = provenance(argv=["bench/variants.py", *argv] if argv is not None else None)
    results["command"] = results["provenance"]["command"]
    # kernel timings on tensors, no checkpoint: say so, as the provenance's empty "models" alone does not
    results["weights"] = "none: seeded random queries and K/V (torch.Generator seed 0) in each timed shape"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(f"<!-- generated: {out.name}.json {RENDERER} -->\n{markdown(results)}"
                                      "<!-- end generated -->\n")
    return results


if __name__ == "__main__":
    main()
