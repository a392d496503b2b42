"""``hf-attn-swap plan``: project decode latency, tokens/s, cache bytes and the largest batch of attention variants of
a model on a GPU (datasheet figures) or on this CPU (measured), from the roofline model of
:mod:`hf_attn_swap.eval.roofline`."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from ..cli import echo
from ..cliconfig import add_config_command, check_fields, config_from_args, dump_yaml, opt


@dataclass
class PlanConfig:
    """Options of ``hf-attn-swap plan``."""

    model: str = opt("llama-3-8b", help="a config.json (or its folder), or llama-2-7b, llama-3-8b, llama-3-70b")
    variants: str = opt("baseline,gqa:groups=1,sliding_window:window=4096,linear,hybrid:window=64",
                        help="comma-separated variant specs: baseline, gqa:groups=N, mqa, sliding_window:window=W, "
                        "linear, hybrid:window=W")
    hardware: list[str] = opt(default_factory=lambda: ["A100-80GB", "H100-SXM", "H200"],
                              help="profiles: A100-80GB, H100-SXM, H200, cpu (measured now) or a JSON file")
    contexts: list[int] = opt(default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072], min=1,
                              help="tokens already in the cache")
    batch: int = opt(1, min=1, help="sequences decoded together")
    devices: int = opt(1, min=1, help="GPUs sharing the model (ideal tensor parallelism: bandwidth, FLOPs and "
                       "memory add up, no communication counted)")
    threads: int = opt(1, min=1, help="torch threads for the measured cpu profile")
    json: bool = opt(False, help="print JSON rows instead of Markdown tables")

    def __post_init__(self) -> None:
        check_fields(self)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_config_command(
        sub, "plan", PlanConfig,
        help="project decode ms/token, tokens/s, cache bytes and max batch of variants on a GPU or this CPU",
        description=(
            "Roofline projection: per decode step, the bytes a model's weights and each variant's cache or state "
            "need to move and the FLOPs it needs, divided by a machine's bandwidth and FLOP rate (whichever is "
            "slower, for the matrices and for the attention). Prints per-token latency, tokens/s, cache bytes per sequence and the largest batch that fits "
            "beside the weights, per variant and context. GPU figures are the vendors' datasheet numbers (dense "
            "bf16); cpu measures this machine (a few seconds)."
        ),
        examples=[
            "hf-attn-swap plan                                        # Llama-3-8B on A100/H100/H200",
            "hf-attn-swap plan --model llama-3-70b --devices 2 --hardware [H200]",
            "hf-attn-swap plan --model ./my-model --hardware [cpu] --contexts [4096,32768] --batch 8",
        ],
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(PlanConfig, args)
    if args.print_config:
        echo(dump_yaml(cfg), end="")
        return 0
    from ..eval.roofline import format_plan, plan

    rows = []
    for hw in cfg.hardware:
        rows += plan(cfg.model, cfg.variants, hw, contexts=cfg.contexts, batch=cfg.batch, threads=cfg.threads,
                     devices=cfg.devices)
    if cfg.json:
        echo(json.dumps(rows, indent=2))
    else:
        echo(format_plan(rows))
        echo("\nmax batch: sequences whose cache fits beside the weights (activations not counted); 0 = the weights "
             "alone do not fit. Sources: hf_attn_swap/eval/roofline.py GPU_PROFILES.")
    return 0
