"""Does uptraining's per-layer stage overfit its rows? Train and held-out error of a layer against steps and text.

SmolLM2-135M is converted 3 -> 1 KV heads by ``fit`` (calibrated on the training corpora), then a few layers' attention
(Q/K/V/O) are trained by :func:`hf_attn_swap.train.layerwise_transfer` in three settings:

- ``rows`` tokens and ``steps`` steps: the default recipe's per-layer stage (uptrain_smollm2_mqa.yaml);
- the same rows, 4x the steps: is the stage short of optimisation?
- 3x the rows at 1.5x the steps (fewer passes over each row): is it short of text?

Every ``--every`` steps the layer's relative output error (MSE / mean square of the teacher's output) is measured on
its own training rows and on held-out text from two domains no recipe trains on (sotu, devils-dictionary validation
splits), which gives the curves. The training text is the five real corpora of the recipe's mix in equal shares (the
generated sources, teacher samples and recall rows, are left out: they cost minutes to make and do not change the
question).

Run: python bench/layerwise_overfit.py --threads 1 [--layers 4,12,22] [--out results/layerwise_overfit]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whichever copy is installed

RENDERER = "bench/layerwise_overfit.py:markdown"
TRAIN = ("shakespeare", "kjv", "austen", "python-docs", "jargon")
HELD = ("sotu", "devils-dictionary")


def rows_of(tok, names, split: str, tokens_each: int, block: int, skip: int = 0) -> torch.Tensor:
    """``tokens_each`` tokens of every corpus (after the first ``skip``), cut into rows of ``block``, interleaved."""
    from hf_attn_swap.data import load_text, tokenize

    tokens_each = -(-tokens_each // block) * block  # whole rows: round up
    per = []
    for name in names:
        ids = tokenize(tok, load_text(name, split), skip + tokens_each)
        if ids.numel() < skip + tokens_each:
            raise SystemExit(f"{name} ({split}) has {ids.numel()} tokens, fewer than {skip + tokens_each}")
        per.append(ids[skip: skip + tokens_each].view(-1, block))
    return torch.stack(per, 1).reshape(-1, block)  # row i of every corpus, then row i + 1: a prefix is balanced


def measure(args: argparse.Namespace) -> dict:
    from hf_attn_swap import swap_attention
    from hf_attn_swap.api import attention_sites
    from hf_attn_swap.provenance import provenance
    from hf_attn_swap.train.layerwise import _batches, _module_out, capture_teacher, layerwise_transfer, module_kwargs
    from hf_attn_swap.zoo import load_model

    torch.set_num_threads(args.threads)
    teacher, tok = load_model("smollm2-135m")
    block, layers = args.block, [int(x) for x in args.layers.split(",")]
    n = len(TRAIN)
    calib = rows_of(tok, TRAIN, "train", args.calib_tokens // n, block)
    wide = rows_of(tok, TRAIN, "train", args.rows_tokens * args.wide // n, block, skip=args.calib_tokens // n)
    base_rows = wide[: len(wide) // args.wide]  # the default's rows are a prefix of the wide set
    held = rows_of(tok, HELD, "validation", args.held_tokens // len(HELD), block)

    student = copy.deepcopy(teacher)
    t = time.process_time()
    swap_attention(student, "mqa", strategy="fit", calibration=calib)
    convert_cpu = time.process_time() - t
    sites = attention_sites(student)
    start = {i: copy.deepcopy(sites[i].module.state_dict()) for i in layers}
    hb = _batches(held, 4)
    hx, hy = capture_teacher(teacher, hb, layers)
    kwargs = module_kwargs(student, hb[0])

    def rel(module, x, y) -> float:
        return float((_module_out(module, x, kwargs) - y).pow(2).mean() / y.pow(2).mean())

    settings = [("default", base_rows, args.steps), ("4x steps, same rows", base_rows, 4 * args.steps),
                (f"{args.wide}x rows, 1.5x steps", wide, int(1.5 * args.steps))]
    runs = []
    for name, rows, steps in settings:
        for i in layers:
            sites[i].module.load_state_dict(start[i])
        tx, ty = capture_teacher(teacher, _batches(rows[: 2 * args.probe_rows], 2), layers)  # a train-row probe
        curve: dict[int, list[dict]] = {i: [] for i in layers}

        def on_steps(layer: int, done: int, module, tx=tx, ty=ty, curve=curve) -> None:
            j = layers.index(layer)
            curve[layer].append({"step": done, "train": rel(module, tx[j], ty[j]),
                                 "held_out": rel(module, hx[j], hy[j])})

        t = time.process_time()
        layerwise_transfer(student, teacher, rows, layers=layers, steps=steps, lr=args.lr, batch_rows=2,
                                 on_steps=on_steps, on_steps_every=args.every)
        runs.append({"setting": name, "tokens": int(rows.numel()), "steps": steps,
                     "passes": round(steps * 2 / len(rows), 2), "cpu_s": round(time.process_time() - t, 1),
                     "layers": {str(i): {"train": curve[i][-1]["train"], "held_out": curve[i][-1]["held_out"],
                                         "start_held_out": curve[i][0]["held_out"], "curve": curve[i]}
                                for i in layers}})
        print(name, {i: (round(curve[i][-1]["train"], 3), round(curve[i][-1]["held_out"], 3)) for i in layers},
              flush=True)
    for i in layers:
        sites[i].module.load_state_dict(start[i])
    return {"model": "smollm2-135m", "conversion": "mqa:strategy=fit", "calibration_tokens": int(calib.numel()),
            "convert_cpu_s": round(convert_cpu, 1), "train_corpora": list(TRAIN), "held_out_corpora": list(HELD),
            "held_out_tokens": int(held.numel()), "block": block, "lr": args.lr, "layers": layers, "runs": runs,
            "provenance": provenance(models=[teacher], corpora=[*TRAIN, *HELD])}


def markdown(res: dict) -> str:
    from hf_attn_swap.eval.report import provenance_lines

    layers = [str(i) for i in res["layers"]]
    lines = ["# Per-layer stage: optimisation or text? (generated by bench/layerwise_overfit.py)", "",
             f"{res['model']} converted by {res['conversion']} ({res['calibration_tokens']} calibration tokens); "
             f"layers {', '.join(layers)} trained alone (Q/K/V/O, Adam lr {res['lr']}, 2 rows of {res['block']} "
             f"tokens a step) on the five corpora {', '.join(res['train_corpora'])}. Relative output error = MSE / "
             "mean square of the teacher module's output, on the layer's own training rows and on "
             f"{res['held_out_tokens']} tokens of {', '.join(res['held_out_corpora'])} (never trained on).", "",
             "| setting | tokens | steps | passes over the rows | CPU s | "
             + " | ".join(f"layer {i} train / held-out" for i in layers) + " |",
             "|---|---:|---:|---:|---:|" + "---|" * len(layers)]
    first = res["runs"][0]["layers"]
    lines.append("| after conversion | - | 0 | - | - | "
                 + " | ".join(f"- / {first[i]['start_held_out']:.3f}" for i in layers) + " |")
    for r in res["runs"]:
        lines.append(f"| {r['setting']} | {r['tokens']} | {r['steps']} | {r['passes']} | {r['cpu_s']} | "
                     + " | ".join(f"{r['layers'][i]['train']:.3f} / {r['layers'][i]['held_out']:.3f}" for i in layers)
                     + " |")
    best = min(res["runs"], key=lambda r: sum(r["layers"][i]["held_out"] for i in layers))
    base = res["runs"][0]
    gap = {r["setting"]: sum(r["layers"][i]["held_out"] - r["layers"][i]["train"] for i in layers) / len(layers)
           for r in res["runs"]}
    lines += ["", f"Lowest held-out error: **{best['setting']}**. Mean held-out minus train error: "
              + ", ".join(f"{k} {v:.3f}" for k, v in gap.items()) + f" (the default's: {gap[base['setting']]:.3f}).",
              "", "Curves: layerwise_overfit.png (train dashed, held-out solid).", ""]
    return "\n".join(lines + provenance_lines(res["provenance"])) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [str(i) for i in res["layers"]]
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.6), squeeze=False)
    for ax, i in zip(axes[0], layers):
        for k, r in enumerate(res["runs"]):
            c = r["layers"][i]["curve"]
            ax.plot([p["step"] for p in c], [p["held_out"] for p in c], "-", color=f"C{k}", label=r["setting"])
            ax.plot([p["step"] for p in c], [p["train"] for p in c], "--", color=f"C{k}")
        ax.set(title=f"layer {i}", xlabel="steps", ylabel="relative output error")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="4,12,22")
    p.add_argument("--rows-tokens", type=int, default=16384, help="the default recipe's per-layer tokens")
    p.add_argument("--wide", type=int, default=3, help="the third setting's multiple of the rows")
    p.add_argument("--steps", type=int, default=80, help="the default recipe's steps per layer")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--held-tokens", type=int, default=4096)
    p.add_argument("--probe-rows", type=int, default=4, help="training rows the train error is measured on")
    p.add_argument("--every", type=int, default=10, help="steps between two points of a curve")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/layerwise_overfit")
    args = p.parse_args(argv)
    res = measure(args)
    from hf_attn_swap.eval.report import write_generated

    out = Path(args.out)
    write_generated(res, out, RENDERER, markdown)
    plot(res, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
