"""The decode kernel against SDPA and against memory's own rate, side by side in one run.

One decode step's attention over every layer of a model (one query token per sequence, the K/V cache of each layer
filled to the context, a static cache's boolean mask with its unused tail), in float32 on the CPU, through
``grouped_attention`` as a converted model calls it:

- ``kernel``: the streaming decode kernel (``band_cpu.c``: K and V read once, online softmax), the version model
  decode steps take here (AVX-512 where the CPU has it);
- ``avx2``: its AVX2 version, called directly (what model decode steps take on a CPU without AVX-512);
- ``sdpa``: the same call under ``band_cpu.off()`` (SDPA over the folded query heads, what runs without the kernel);
- ``sum``: ``K.sum() + V.sum()`` over the same tensors, the rate at which this CPU reads them at all.

Every layer has its own K/V tensors, so a step reads the whole cache from memory, not from the caches, as a real
decode step does. Shapes are SmolLM2-135M's (30 layers, 9 query heads, head dim 64) at 3 KV heads (as shipped) and
1 (MQA), and four layers of Llama-3-8B's (32 query heads on 8 KV heads, head dim 128: 4.3 GB at 8k x 8). Median of repeats
(``torch.utils.benchmark``) after a warm-up.

Run: python bench/decode_kernel.py --threads 1 [--context 8192 --batch 8] [--out results/decode_kernel]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whichever copy is installed

RENDERER = "bench/decode_kernel.py:markdown"
# name: (layers, query heads, KV heads, head dim)
SHAPES = {
    "smollm2 gqa-3": (30, 9, 3, 64),
    "smollm2 mqa": (30, 9, 1, 64),
    "llama-3-8b gqa-8 (4 of 32 layers)": (4, 32, 8, 128),  # all 32 at 8k x 8 would be 34 GB of K/V
}


class _Attention(torch.nn.Module):
    is_causal = True


def timed(fn, min_run_time: float) -> float:
    from torch.utils import benchmark

    fn()  # warm-up
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def measure(args: argparse.Namespace) -> dict:
    from hf_attn_swap.provenance import provenance
    from hf_attn_swap.variants import band_cpu
    from hf_attn_swap.variants.gqa import grouped_attention

    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads, "context": args.context, "batch": args.batch,
                 "kernel_available": band_cpu.decode_available(64, "avx512"),
                 "avx2_available": band_cpu.decode_available(64, "avx2"), "reason": band_cpu.decode_unavailable_reason(),
                 "rows": []}
    g = torch.Generator().manual_seed(0)
    module = _Attention()
    for name, (layers, h, h_kv, d) in SHAPES.items():
        layers = min(layers, args.max_layers)
        n, b = args.context, args.batch
        kv_bytes = 2 * layers * b * h_kv * n * d * 4
        if kv_bytes > args.max_gib * 2**30:
            res["rows"].append({"shape": name, "skipped": f"{kv_bytes / 2**30:.1f} GiB of K/V > --max-gib"})
            continue
        ks = [torch.randn(b, h_kv, n, d, generator=g) for _ in range(layers)]
        vs = [torch.randn(b, h_kv, n, d, generator=g) for _ in range(layers)]
        q = torch.randn(b, h, 1, d, generator=g)
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        mask[..., n - 16:] = False  # a static cache's slots past the context

        def attend(ks=ks, vs=vs, q=q, mask=mask):
            for k, v in zip(ks, vs):
                grouped_attention(module, q, k, v, mask)

        def avx2(ks=ks, vs=vs, q=q, valid=mask[:, 0, 0]):
            for k, v in zip(ks, vs):
                band_cpu.decode_attention(q, k, v, scale=d**-0.5, key_valid=valid, isa="avx2")

        def read(ks=ks, vs=vs):
            for k, v in zip(ks, vs):
                k.sum()
                v.sum()

        with torch.no_grad():
            row = {"shape": name, "layers": layers, "heads": h, "kv_heads": h_kv, "head_dim": d, "kv_bytes": kv_bytes}
            row["sum_s"] = timed(read, args.min_run_time)
            with band_cpu.off():
                row["sdpa_s"] = timed(attend, args.min_run_time)
            if res["kernel_available"]:
                row["kernel_s"] = timed(attend, args.min_run_time)
                row["kernel_over_sdpa"] = row["sdpa_s"] / row["kernel_s"]
                row["kernel_over_sum"] = row["kernel_s"] / row["sum_s"]
            if res["avx2_available"]:
                row["avx2_s"] = timed(avx2, args.min_run_time)
                row["avx2_over_sdpa"] = row["sdpa_s"] / row["avx2_s"]
        for k in ("sum", "sdpa", "kernel", "avx2"):
            if f"{k}_s" in row:
                row[f"{k}_gbps"] = kv_bytes / row[f"{k}_s"] / 1e9
        res["rows"].append(row)
        del ks, vs
    res["provenance"] = provenance()
    # no model is loaded: the figures depend on shapes, not on weights
    res["weights"] = "none: seeded random queries and K/V (torch.Generator seed 0) in each row's shape"
    return res


def markdown(res: dict) -> str:
    from hf_attn_swap.eval.report import provenance_lines

    lines = ["# Decode attention: the kernel against SDPA (generated by bench/decode_kernel.py)", "",
             f"One decode step's attention over every layer, {res['context']:,} cached tokens x {res['batch']} "
             f"sequences, float32, {res['threads']} thread(s); each layer's own K/V, so the step reads the whole "
             "cache from memory. `sum` reads the same bytes with `Tensor.sum()`: the rate this CPU reads memory at "
             f"all. Median of repeats after a warm-up, all in one run. Weights: {res.get('weights', '-')}.", ""]
    if not res["kernel_available"]:
        lines += [f"No AVX-512 version here ({res['reason'] or 'this CPU lacks AVX-512F'}).", ""]
    lines += ["| shape | layers x heads / KV heads x dim | K/V read | sum (ms, GB/s) | SDPA (ms, GB/s) | "
              "kernel (ms, GB/s) | kernel speed-up over SDPA | kernel / sum | AVX2 version (ms) | its speed-up |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        cell = lambda k: f"{r[k + '_s'] * 1e3:,.1f} ({r[k + '_gbps']:.1f})" if k + "_s" in r else "-"  # noqa: E731
        lines.append(f"| {r['shape']} | {r['layers']} x {r['heads']} / {r['kv_heads']} x {r['head_dim']} | "
                     f"{r['kv_bytes'] / 1e9:.2f} GB | {cell('sum')} | {cell('sdpa')} | {cell('kernel')} | "
                     + (f"{r['kernel_over_sdpa']:.2f}x | {r['kernel_over_sum']:.2f}x |" if "kernel_s" in r else "- | - |")
                     + (f" {r['avx2_s'] * 1e3:,.1f} | {r['avx2_over_sdpa']:.2f}x |" if "avx2_s" in r else " - | - |"))
    lines += ["", "Where the kernel stays above `sum`, the arithmetic (2 x G x d FLOPs per key for G query heads per KV "
              "head, fp32) is not hidden under the read: it shows most at G = 9 (MQA). The AVX2 version (what a CPU "
              "without AVX-512 runs) is compared with an SDPA that uses this CPU's AVX-512.",
              ""]
    return "\n".join(lines + provenance_lines(res.get("provenance"))) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-layers", type=int, default=64, help="time at most this many layers per shape")
    p.add_argument("--max-gib", type=float, default=8.0, help="skip a shape whose K/V would exceed this")
    p.add_argument("--min-run-time", type=float, default=3.0, help="seconds of repeats per timing")
    p.add_argument("--out", default="results/decode_kernel")
    args = p.parse_args(argv)
    from hf_attn_swap.eval.report import write_generated

    write_generated(measure(args), args.out, RENDERER, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
