"""``hf-attn-swap uptrain``: convert a model and uptrain it (per-layer attention transfer, then distillation)."""

from __future__ import annotations

import argparse
import json

from ..cli import echo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "uptrain",
        help="convert a model's attention and win back what the conversion lost by training",
        description="Stages: per-layer attention-output matching on the teacher's hidden states, then end-to-end "
        "training (LM / logit distillation / attention transfer) on the HF Trainer. Options come from a YAML/JSON "
        "config (see recipes/configs/uptrain_*.yaml) with key=value overrides; run under `accelerate launch` for "
        "several GPUs.",
    )
    p.add_argument("--config", help="a YAML or JSON UptrainConfig file (defaults otherwise)")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the run in output_dir (its latest checkpoint, or the checkpoint path given)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds a previous run or other files (never deletes them)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. tokens=50000 lr=1e-4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import UptrainConfig, uptrain

    cfg = UptrainConfig.load(args.config) if args.config else UptrainConfig()
    cfg = cfg.override(list(args.overrides))
    if args.print_config:
        echo(cfg.to_yaml(), end="")
        return 0
    result = uptrain(cfg, resume=args.resume, overwrite=args.overwrite)
    summary = {k: result.to_dict()[k] for k in ("ppl_original", "ppl_converted", "ppl_uptrained", "recovery",
                                                  "tokens", "seconds", "output_dir")}
    echo(json.dumps(summary, indent=2))
    return 0
