"""``hf-attn-swap uptrain``: convert a model and uptrain it (per-layer attention transfer, then distillation)."""

from __future__ import annotations

import argparse
import json

from ..cli import echo, use_threads
from ..cliconfig import add_config_command, config_from_args
from ..train.config import UptrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = add_config_command(
        sub, "uptrain", UptrainConfig,
        help="convert a model's attention and win back what the conversion lost by training",
        description="Stages: per-layer attention-output matching on the teacher's hidden states, then end-to-end "
        "training (LM / logit distillation / attention transfer) on the HF Trainer. Options come from the flags "
        "below, a YAML/JSON --config (see recipes/configs/uptrain_*.yaml) and trailing key=value overrides; run "
        "under `accelerate launch recipes/uptrain.py` for several GPUs.",
        examples=[
            "hf-attn-swap uptrain --config recipes/configs/uptrain_smollm2_mqa.yaml",
            "hf-attn-swap uptrain --config recipes/configs/uptrain_smollm2_mqa.yaml tokens=32768 lr=1e-4 threads=2",
            "hf-attn-swap uptrain --variant linear --variant-options '{feature_map: hedgehog, window: 64}' "
            "--trainable lora --print-config",
            "hf-attn-swap uptrain --config recipes/configs/uptrain_smollm2_mqa.yaml --resume",
        ],
    )
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in output_dir (its latest checkpoint, or the checkpoint path given)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(UptrainConfig, args)
    if args.print_config:
        echo(cfg.to_yaml(), end="")
        return 0
    use_threads(cfg.threads)
    from ..train import uptrain

    result = uptrain(cfg, resume=args.resume, overwrite=cfg.overwrite)
    summary = {k: result.to_dict()[k] for k in ("ppl_original", "ppl_converted", "ppl_uptrained", "recovery",
                                                  "tokens", "seconds", "output_dir")}
    echo(json.dumps(summary, indent=2))
    return 0
