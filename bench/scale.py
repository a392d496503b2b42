"""Conversion at scale: wall time and peak RSS of ``hf-attn-swap convert`` on random-initialised llama checkpoints.

Each size is a llama-architecture checkpoint with random weights written once in bfloat16 under
``<cache>/scale/<size>/`` (no tokenizer: calibration uses uniformly random token ids within the config's vocabulary,
seeded, so the statistics are not those of text; the memory and time are what this measures). Each conversion runs
``python -m hf_attn_swap.cli convert --model DIR --variant gqa:groups=G,strategy=S --eval-tokens 0 --dtype bfloat16``
in its own process; its peak RSS is the kernel's high-water mark for exactly that process (``os.wait4`` rusage
``ru_maxrss``), its wall time is measured around it, and ``convert_s`` is the conversion alone as the command reports.

Goal: peak RSS <= 1.3 x the bf16 weights + one layer's calibration activations; time linear in size.

Two more parts go into the same report (``--parts``; each part replaces only its own section of scale.json, with its
own command and provenance, so the parts can run at different times):

- ``processes``: the per-layer stage of ``uptrain`` on SmolLM2-135M (real weights and text, 30 layers), once in one
  process and once under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU), each process on one
  thread; the stage's own seconds (capture + training + the gather) give the speed-up. Needs the cores idle.
- ``parity``: SmolLM2-135M perplexity (2048 held-out Shakespeare tokens, context 512) in float32 and in bfloat16 for
  the baseline, flash and sliding_window 256 (the issue's "within 1%" check, with the figures kept).

Run (all sizes; needs ~20 GiB free for 3b): python bench/scale.py --sizes 0.36b,1.1b,3b --threads 1
Smallest only:                             python bench/scale.py --sizes 0.36b --threads 1 --parts conversion
The other two parts:                        python bench/scale.py --parts processes,parity
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/scale.py` puts bench/ first on sys.path: import this checkout's package (as the convert
# subprocesses, run from ROOT, do), not whichever copy is installed, so the provenance names the measured code.
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Size:
    """One llama shape (vocab 32000, untied embeddings, head_dim 64)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000


SIZES = {
    s.name: s
    for s in (
        Size("0.36b", hidden=1024, layers=26, heads=16, kv_heads=4, intermediate=2816),
        Size("1.1b", hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632),  # TinyLlama's shape
        Size("3b", hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192),  # Llama-3.2-3B, 32k vocab
    )
}


def llama_config(size: Size):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )


def build(size: Size, dest: Path) -> None:
    """Write a random-initialised bf16 checkpoint of ``size`` to ``dest`` (atomic: a crash leaves no half folder)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_attn_swap.fetch import atomic_dir

    def fill(tmp: Path) -> None:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llama_config(size), dtype=torch.bfloat16)
        model.save_pretrained(tmp)

    atomic_dir(dest, fill)


def checkpoint(size: Size) -> Path:
    """The cached checkpoint folder of ``size``, built in a subprocess on first use (keeps this process small)."""
    from hf_attn_swap.fetch import cache_dir

    dest = cache_dir() / "scale" / size.name
    if not (dest / "config.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", size.name], check=True, cwd=ROOT)
        print(f"built {size.name} in {time.perf_counter() - t:.0f} s: {dest}", flush=True)
    return dest


def run_measured(cmd: list[str]) -> tuple[int, float, int, str, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS bytes of that process, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own high-water mark, not all children's
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, wall, usage.ru_maxrss * 1024, out.read(), err.read()


def calib_bytes(size: Size, tokens: int, batch_tokens: int) -> int:
    """Calibration working set beyond the weights: the carried bf16 hidden states of every calibration token, one
    batch's MLP activations (gate, up, product in bf16) and one float64 (E+1)^2 second moment."""
    return tokens * size.hidden * 2 + 3 * batch_tokens * size.intermediate * 2 + (size.hidden + 1) ** 2 * 8


def provenance(args: argparse.Namespace, folders: list[Path]) -> dict:
    """The package's provenance record (code, versions, machine, load, the checkpoints' hashes) plus what the
    convert subprocesses ran with."""
    from hf_attn_swap.provenance import provenance as record

    return {
        **record(models=[str(f) for f in folders], argv=["bench/scale.py", *sys.argv[1:]]),
        "convert_threads": args.threads,
        "convert_dtype": "bfloat16",
        "weights_note": "random-initialised (seed 0) llama checkpoints written by bench/scale.py --build",
        "calibration_note": "uniformly random token ids within the vocabulary (seed 0): the checkpoints have no "
        "tokenizer",
    }


def runtime_baseline() -> int:
    """Peak RSS of a process that only imports torch, transformers and the llama model code (no weights)."""
    code = "import torch, transformers; from transformers import LlamaForCausalLM; import hf_attn_swap.variants.gqa"
    rc, _, peak, _, err = run_measured([sys.executable, "-c", code])
    if rc != 0:
        raise SystemExit(f"baseline import failed:\n{err[-2000:]}")
    return peak


def measure(args: argparse.Namespace, out: Path | None = None) -> dict:
    """Every size x strategy; with ``out``, the report is rewritten after each row, so a run stopped part-way (a
    busy machine, a deadline) keeps what it measured."""
    rows, folders = [], []
    baseline = runtime_baseline()
    print(f"runtime baseline (imports only): {baseline / 2**30:.2f} GiB", flush=True)
    for name in args.sizes.split(","):
        size = SIZES[name]
        folder = checkpoint(size)
        folders.append(folder)
        prov = provenance(args, folders) if out is not None else None  # hashes the checkpoints: once per size
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        for strategy in args.strategies.split(","):
            cmd = [sys.executable, "-m", "hf_attn_swap.cli", "convert", "--model", str(folder),
                   "--variant", f"gqa:groups={args.groups},strategy={strategy}", "--eval-tokens", "0",
                   "--calib-tokens", str(args.calib_tokens), "--dtype", "bfloat16", "--threads", str(args.threads)]
            rc, wall, peak, stdout, err = run_measured(cmd)
            if rc != 0:
                raise SystemExit(f"{name} {strategy} failed ({rc}):\n{err[-3000:]}")
            report = json.loads(stdout[stdout.index("\n{") + 1:])
            act = calib_bytes(size, args.calib_tokens, 2048) if strategy == "fit" else 0
            row = {
                "size": name, **{k: v for k, v in asdict(size).items() if k != "name"},
                "params": weights // 2, "weights_bytes": weights, "strategy": strategy, "groups": args.groups,
                "calibration_tokens": args.calib_tokens if strategy == "fit" else 0,
                "wall_s": round(wall, 1), "convert_s": report["convert_s"], "peak_rss_bytes": peak,
                "peak_over_weights": round(peak / weights, 3),
                "peak_minus_runtime_over_weights": round((peak - baseline) / weights, 3),
                "calib_working_set_bytes": act,
                "goal_bytes": int(1.3 * weights + act), "within_goal": peak <= 1.3 * weights + act,
                "within_goal_beyond_runtime": peak - baseline <= 1.3 * weights + act,
                "command": " ".join(shlex.quote(c) for c in cmd[1:]),
            }
            rows.append(row)
            if out is not None:
                kept = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {}
                kept = {k: v for k, v in kept.items() if k in ("processes", "parity")}
                write_report({**kept, "provenance": prov, "runtime_baseline_bytes": baseline, "rows": rows}, out)
            print(f"{name:6s} {strategy:5s} wall {wall:7.1f} s  convert {report['convert_s']:7.1f} s  peak RSS "
                  f"{peak / 2**30:6.2f} GiB = {peak / weights:.2f} x weights ({weights / 2**30:.2f} GiB)", flush=True)
    return {"provenance": provenance(args, folders), "runtime_baseline_bytes": baseline, "rows": rows}


PARTS = ("conversion", "processes", "parity")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # never accelerate's default 29500: another run may hold it
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_processes(args: argparse.Namespace) -> dict:
    """The per-layer stage on 1 and on 2 processes (same config, same layers, same seeds: same weights)."""
    from hf_attn_swap.provenance import provenance as record
    from hf_attn_swap.train import UptrainConfig

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            cfg = UptrainConfig(model="smollm2-135m", variant="mqa", variant_options={"strategy": "mean"},
                                conversion_tokens=0, corpus="shakespeare", eval_windows=0,
                                layerwise_tokens=args.layerwise_tokens, layerwise_steps=args.layerwise_steps,
                                layerwise_rows=2, block_size=256, tokens=0, output_dir=f"{tmp}/p{n}", progress=False,
                                threads=1, device="cpu")
            path = Path(tmp) / f"p{n}.json"
            cfg.save(path)
            cli = ["-m", "hf_attn_swap.cli", "uptrain", "--config", str(path)]
            if n == 1:
                cmd = [sys.executable, *cli]
            else:  # --multi_gpu starts the processes through torch.distributed.run; without CUDA they form gloo
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(_free_port()), *cli]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"per-layer stage on {n} process(es) failed ({proc.returncode}):\n"
                                 f"{proc.stderr[-3000:]}")
            saved = json.loads((Path(cfg.output_dir) / "uptrain_result.json").read_text())
            lw = saved["layerwise"]
            results[n] = {"processes": saved["processes"], "layerwise_seconds": round(lw["seconds"], 2),
                          "wall_s": round(wall, 1), "layers": len(lw["layers"]),
                          "ranks": sorted({s["rank"] for s in lw["layers"]}),
                          "mse_after": [s["mse_after"] for s in lw["layers"]]}
            print(f"per-layer stage, {n} process(es): {lw['seconds']:.1f} s (whole command {wall:.0f} s)", flush=True)
    one, two = results[1], results[2]
    return {
        "model": "smollm2-135m", "variant": "mqa:strategy=mean", "layerwise_tokens": args.layerwise_tokens,
        "layerwise_steps": args.layerwise_steps, "threads_per_process": 1, "one": one, "two": two,
        "speedup": round(one["layerwise_seconds"] / two["layerwise_seconds"], 3),
        # the split's promise: same layers, same seeds, same weights (bit-equal MSE after, layer by layer)
        "same_weights": one["mse_after"] == two["mse_after"],
        "provenance": record(models=["smollm2-135m"], corpora=["shakespeare"],
                             argv=["bench/scale.py", *sys.argv[1:]]),
    }


PARITY_VARIANTS = {"baseline": None, "flash": ("flash", {}), "sliding_window:window=256": ("sliding_window",
                                                                                          {"window": 256})}


def measure_parity(args: argparse.Namespace) -> dict:
    """SmolLM2-135M perplexity in float32 and bfloat16 per variant (swap in float32, then cast the model)."""
    import copy

    import torch

    from hf_attn_swap import swap_attention
    from hf_attn_swap.data import load_text, tokenize
    from hf_attn_swap.eval.perplexity import perplexity
    from hf_attn_swap.provenance import provenance as record
    from hf_attn_swap.zoo import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ids = tokenize(tok, load_text("shakespeare", split="validation"), args.parity_tokens)
    rows = []
    for name, spec in PARITY_VARIANTS.items():
        work = copy.deepcopy(model)
        if spec is not None:
            swap_attention(work, spec[0], **spec[1])
        with torch.no_grad():
            t = time.perf_counter()
            p32 = perplexity(work, ids, context=512, batch_size=1).token_ppl
            t32 = time.perf_counter() - t
            work.to(torch.bfloat16)
            t = time.perf_counter()
            p16 = perplexity(work, ids, context=512, batch_size=1).token_ppl
            t16 = time.perf_counter() - t
        rel = (p16 - p32) / p32
        rows.append({"variant": name, "ppl_float32": p32, "ppl_bfloat16": p16, "relative": rel,
                     "within_1_percent": abs(rel) < 0.01, "seconds_float32": round(t32, 1),
                     "seconds_bfloat16": round(t16, 1)})
        print(f"{name}: float32 {p32:.4f}, bfloat16 {p16:.4f} ({100 * rel:+.3f}%)", flush=True)
        del work
    return {"model": "smollm2-135m", "corpus": "shakespeare (validation)", "tokens": int(ids.numel()),
            "context": 512, "threads": args.threads, "rows": rows,
            "provenance": record(models=[model], corpora=["shakespeare"], argv=["bench/scale.py", *sys.argv[1:]])}


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result.get("rows") or []
    lines = [
        "# Conversion at scale (generated by bench/scale.py from scale.json)",
        "",
        "Random-initialised llama checkpoints in bfloat16, converted by `hf-attn-swap convert` in a subprocess; "
        "peak RSS is that process's kernel high-water mark (weights loading included). Calibration: random token ids.",
        "",
        f"Runtime baseline (a process that only imports torch, transformers and the package): "
        f"{result.get('runtime_baseline_bytes', 0) / 2**30:.2f} GiB; the last columns compare the peak above it.",
        "",
        "| size | params | weights GiB | strategy | calib tokens | wall s | convert s | peak RSS GiB | peak / weights "
        "| goal GiB (1.3 x weights + calib) | within goal | (peak - runtime) / weights | within goal beyond runtime |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['weights_bytes'] / 2**30:.2f} | {r['strategy']} | "
            f"{r['calibration_tokens']} | {r['wall_s']} | {r['convert_s']} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{r['peak_over_weights']} | {r['goal_bytes'] / 2**30:.2f} | {'yes' if r['within_goal'] else 'no'} | "
            f"{r['peak_minus_runtime_over_weights']} | {'yes' if r['within_goal_beyond_runtime'] else 'no'} |"
        )
    from hf_attn_swap.eval.report import provenance_lines

    p = result.get("provenance")
    if p:
        lines += ["", f"Command: `{p['command']}` (each convert process: {p.get('convert_threads')} torch thread(s), "
                  f"{p.get('convert_dtype')}). Calibration: {p.get('calibration_note', '')}.", ""]
        lines += provenance_lines(p)
    else:
        lines += ["", "Not measured yet: `python bench/scale.py --parts conversion`."]
    lines += processes_lines(result.get("processes"), provenance_lines)
    lines += parity_lines(result.get("parity"), provenance_lines)
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "scale.png")


def processes_lines(part: dict | None, provenance_lines) -> list[str]:
    if not part:
        return ["", "## Per-layer stage on 1 and 2 processes", "", "Not measured yet: `python bench/scale.py --parts "
                "processes`."]
    one, two = part["one"], part["two"]
    lines = [
        "", "## Per-layer stage on 1 and 2 processes", "",
        f"`uptrain`'s per-layer stage on {part['model']} ({part['variant']}, {one['layers']} layers, "
        f"{part['layerwise_tokens']} tokens, {part['layerwise_steps']} steps a layer), {part['threads_per_process']} "
        "thread per process; the second run is `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU), which "
        "gives layer i to process i mod 2 and gathers the trained layers.", "",
        "| processes | per-layer stage s | whole command s | speed-up | same weights as 1 process |",
        "|---|---|---|---|---|",
        f"| 1 | {one['layerwise_seconds']} | {one['wall_s']} | 1.00x | - |",
        f"| 2 | {two['layerwise_seconds']} | {two['wall_s']} | {part['speedup']:.2f}x | "
        f"{'yes' if part['same_weights'] else '**no**'} |", "",
        f"Command: `{part['provenance']['command']}`.", "",
    ]
    return lines + provenance_lines(part["provenance"])


def parity_lines(part: dict | None, provenance_lines) -> list[str]:
    if not part:
        return ["", "## bfloat16 against float32", "", "Not measured yet: `python bench/scale.py --parts parity`."]
    lines = [
        "", "## bfloat16 against float32", "",
        f"{part['model']} perplexity on {part['tokens']} tokens of {part['corpus']} at context {part['context']}, "
        f"{part['threads']} thread(s): the variant is swapped in float32, measured, cast to bfloat16 and measured "
        "again. Goal: within 1%.", "",
        "| variant | float32 | bfloat16 | difference | within 1% | s float32 | s bfloat16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        lines.append(f"| {r['variant']} | {r['ppl_float32']:.3f} | {r['ppl_bfloat16']:.3f} | "
                     f"{100 * r['relative']:+.2f}% | {'yes' if r['within_1_percent'] else '**no**'} | "
                     f"{r['seconds_float32']} | {r['seconds_bfloat16']} |")
    lines += ["", f"Command: `{part['provenance']['command']}`.", ""]
    return lines + provenance_lines(part["provenance"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy, marker in (("mean", "o"), ("fit", "s")):
        sel = [r for r in rows if r["strategy"] == strategy]
        if not sel:
            continue
        x = [r["params"] / 1e9 for r in sel]
        ax_mem.plot(x, [r["peak_rss_bytes"] / 2**30 for r in sel], marker=marker, label=f"peak RSS, {strategy}")
        ax_time.plot(x, [r["wall_s"] for r in sel], marker=marker, label=f"wall, {strategy}")
    sizes = sorted({(r["params"], r["weights_bytes"]) for r in rows})
    # Markers too: with one size measured a line has no length.
    ax_mem.plot([p / 1e9 for p, _ in sizes], [w / 2**30 for _, w in sizes], "k--", marker="_", markersize=14,
                label="bf16 weights")
    ax_mem.plot([p / 1e9 for p, _ in sizes], [1.3 * w / 2**30 for _, w in sizes], "k:", marker="x",
                label="1.3 x weights")
    ax_mem.set(xlabel="parameters (billions)", ylabel="GiB", title="peak RSS of the convert process")
    ax_time.set(xlabel="parameters (billions)", ylabel="seconds", title="wall time (load + convert)")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.36b,1.1b,3b", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--strategies", default="mean,fit", help="gqa strategies to time (comma-separated)")
    parser.add_argument("--groups", type=int, default=1, help="KV heads after conversion")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens for fit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each convert process")
    parser.add_argument("--out", default=str(ROOT / "results"), help="folder for scale.json/.md/.png")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, from {', '.join(PARTS)}; each "
                        "replaces its own section of OUT/scale.json and keeps the others")
    parser.add_argument("--layerwise-tokens", type=int, default=4096, help="processes: per-layer stage tokens")
    parser.add_argument("--layerwise-steps", type=int, default=20, help="processes: per-layer steps a layer")
    parser.add_argument("--parity-tokens", type=int, default=2048, help="parity: held-out tokens")
    parser.add_argument("--report-only", action="store_true", help="redraw scale.md/.png from OUT/scale.json")
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: write one checkpoint
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((Path(args.out) / "scale.json").read_text()), Path(args.out))
        return
    if args.build:
        from hf_attn_swap.fetch import cache_dir

        build(SIZES[args.build], cache_dir() / "scale" / args.build)
        return
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; allowed: {', '.join(SIZES)}")
    parts = args.parts.split(",")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        parser.error(f"unknown part(s) {bad}; allowed: {', '.join(PARTS)}")
    out = Path(args.out)
    previous = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {}
    result = dict(previous)
    if "conversion" in parts:
        conv = measure(args, out)
        result = {**json.loads((out / "scale.json").read_text()), **conv}
    for part, fn in (("processes", measure_processes), ("parity", measure_parity)):
        if part in parts:
            result[part] = fn(args)
            write_report(result, out)  # each part kept as soon as it is measured
    write_report(result, out)


if __name__ == "__main__":
    main()
