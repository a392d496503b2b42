"""What ``mixed_precision: bf16`` buys a training step on this CPU, float32 and bfloat16 side by side in one run.

Times, with ``torch.utils.benchmark`` (warm-up, median of repeats), one optimizer step of each training loop the
package has, in float32 and under bfloat16 autocast (float32 weights and Adam state):

- ``end_to_end``: the uptraining Trainer's step on SmolLM2-135M converted to MQA (``fit``'s shape; weights from
  ``mean``, which costs no calibration): teacher forward, KL distillation, backward through every weight, AdamW;
- ``layerwise``: one per-layer step (one attention module, 2 rows of 512 tokens, Adam) as the per-layer stage runs it;
- ``pretrain``: a step of the ``mha-llama-30m`` pre-training loop (8 x 256 tokens, AdamW), from scratch;
- ``matmul``: a 1024 x 576 x 1536 product (SmolLM2's MLP shape at two rows of 512), for the arithmetic alone.

Rows are real text (Shakespeare's train split). The ratios are what the recipes' budgets rest on
(recipes/configs/uptrain_smollm2_mqa.yaml, pretrain_mha.yaml); the JSON records the CPU's bfloat16 instructions.

Run: python bench/mixed_precision.py --threads 1 [--out results/mixed_precision]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whichever copy is installed

RENDERER = "bench/mixed_precision.py:markdown"
MODES = ("no", "bf16")


def timed(fn, min_run_time: float) -> dict:
    from torch.utils import benchmark

    fn()  # warm-up (allocations, oneDNN's kernel choice)
    m = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times)}


def measure(args: argparse.Namespace) -> dict:
    from transformers import LlamaForCausalLM, TrainingArguments

    from hf_attn_swap import attention_sites, swap_attention
    from hf_attn_swap.data import load_text, token_blocks
    from hf_attn_swap.provenance import provenance
    from hf_attn_swap.train.layerwise import _module_out, capture_teacher, module_kwargs
    from hf_attn_swap.train.precision import autocast, cpu_has_fast_bf16
    from hf_attn_swap.train.pretrain import PretrainConfig, model_config
    from hf_attn_swap.train.trainer import BlockDataset, UptrainTrainer, collate
    from hf_attn_swap.zoo import load_model

    torch.set_num_threads(args.threads)
    teacher, tok = load_model("smollm2-135m")
    rows = token_blocks(tok, load_text("shakespeare", "train"), 512, max_tokens=4096)
    small = token_blocks(tok, load_text("shakespeare", "train"), 256, max_tokens=8 * 256)
    res: dict = {"threads": args.threads, "cpu_fast_bf16": cpu_has_fast_bf16(),
                 "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()),
                 "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: None)()),
                 "steps": {}}

    # end to end: the Trainer's own loss under each mode, backward, AdamW
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean").train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    scratch = tempfile.TemporaryDirectory(prefix="mixed_precision_")  # the Trainer wants an output_dir; unused
    targs = TrainingArguments(output_dir=scratch.name, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    batch = collate([{"input_ids": r} for r in rows[:2]])
    for mp in MODES:
        tr = UptrainTrainer(model=student, args=targs, train_dataset=BlockDataset(rows), data_collator=collate,
                            teacher=teacher, lm_weight=0.0, kl_weight=1.0, mixed_precision=mp)

        def e2e(tr=tr):
            tr.compute_loss(student, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        res["steps"].setdefault("end_to_end", {})[mp] = timed(e2e, args.min_run_time) | {"tokens": batch["input_ids"].numel()}
    del student, opt
    scratch.cleanup()

    # one per-layer step (layer 12), as layerwise_transfer runs it
    student = swap_attention(copy.deepcopy(teacher), "mqa", strategy="mean").eval()
    layer = 12
    xs, ys = capture_teacher(teacher, [rows[:2]], [layer])
    kwargs = module_kwargs(student, rows[:2])
    module = attention_sites(student)[layer].module
    params = [p for p in module.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    adam = torch.optim.Adam(params, lr=1e-6)
    for mp in MODES:
        def lw(mp=mp):
            with autocast(mp, "cpu"):
                y = _module_out(module, xs[0], kwargs)
            (y - ys[0]).pow(2).mean().backward()
            adam.step()
            adam.zero_grad(set_to_none=True)

        res["steps"].setdefault("layerwise", {})[mp] = timed(lw, args.min_run_time) | {"tokens": rows[:2].numel()}
    del student, adam

    # a pre-training step of mha-llama-30m
    torch.manual_seed(0)
    pcfg = PretrainConfig()
    model = LlamaForCausalLM(model_config(pcfg, len(tok))).train()
    popt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for mp in MODES:
        def pre(mp=mp):
            with autocast(mp, "cpu"):
                loss = model(input_ids=small, labels=small).loss
            loss.backward()
            popt.step()
            popt.zero_grad(set_to_none=True)

        res["steps"].setdefault("pretrain", {})[mp] = timed(pre, args.min_run_time) | {"tokens": small.numel()}

    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    for mp in MODES:
        def mm(mp=mp):
            with autocast(mp, "cpu"):
                a @ b

        res["steps"].setdefault("matmul", {})[mp] = timed(mm, args.min_run_time) | {"flops": 2 * 1024 * 576 * 1536}
    for name, d in res["steps"].items():
        d["speedup"] = d["no"]["median_s"] / d["bf16"]["median_s"]
    res["provenance"] = provenance(models=[teacher], corpora=["shakespeare"])
    return res


def markdown(res: dict) -> str:
    from hf_attn_swap.eval.report import provenance_lines

    what = {"end_to_end": "uptraining end-to-end step (SmolLM2 MQA, KL to the teacher, all weights, AdamW)",
            "layerwise": "per-layer step (one SmolLM2 attention module, Adam)",
            "pretrain": "pre-training step (mha-llama-30m from scratch, AdamW)",
            "matmul": "matrix product 1024 x 576 x 1536"}
    lines = ["# bfloat16 mixed precision against float32, per training step (generated by bench/mixed_precision.py)",
             "", f"{res['threads']} thread(s); this CPU: AMX {res['amx']}, AVX512-BF16 {res['avx512_bf16']}. "
             "Median of repeated steps (torch.utils.benchmark) after a warm-up; float32 and bf16 timed one after the "
             "other in one run. bf16 = torch.autocast(bfloat16) with float32 weights and optimizer state.", "",
             "| step | size | float32 (ms) | bf16 (ms) | speed-up |", "|---|---|---:|---:|---:|"]
    for name, d in res["steps"].items():
        size = f"{d['no']['tokens']} tokens" if "tokens" in d["no"] else f"{d['no']['flops'] / 1e9:.2f} GFLOP"
        lines.append(f"| {what.get(name, name)} | {size} | {d['no']['median_s'] * 1e3:,.1f} | "
                     f"{d['bf16']['median_s'] * 1e3:,.1f} | {d['speedup']:.2f}x |")
    lines += ["", "On a CPU without AMX or AVX512-BF16 bfloat16 products are emulated and slower than float32: "
              "`mixed_precision: no` there.", ""]
    return "\n".join(lines + provenance_lines(res["provenance"])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=5.0, help="seconds of repeats per timing")
    p.add_argument("--out", default="results/mixed_precision")
    args = p.parse_args(argv)
    from hf_attn_swap.eval.report import write_generated

    write_generated(measure(args), args.out, RENDERER, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
