"""``hf-attn-swap eval``: perplexity, speed, KV memory and passkey of a model's attention variants vs the baseline."""

from __future__ import annotations

import argparse
import logging

from ..cli import echo, use_threads
from ..cliconfig import add_config_command, config_from_args, dump_yaml
from ..eval.config import EvalConfig

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_config_command(
        sub, "eval", EvalConfig,
        help="compare attention variants: perplexity, prefill/decode speed, KV bytes, passkey (json/csv/md/png)",
        description=(
            "Evaluate the unconverted model and each variant (applied to a fresh copy): strided perplexity "
            "(token, bits/byte, word), prefill latency and cached decode tokens/s, KV-cache bytes (measured and "
            "analytic), peak memory, passkey retrieval. Writes DIR/results.json, results.csv, results.md, "
            "pareto.png and run.json. A variant that is not registered stops the run before the model is loaded "
            "(--missing skip records it and goes on)."
        ),
        examples=[
            "hf-attn-swap eval --out out/eval                      # the default comparison (~11 min on 2 cores)",
            "hf-attn-swap eval --variants baseline,mqa:strategy=fit,sliding_window:window=256 --max-tokens 2048",
            "hf-attn-swap eval --config recipes/configs/eval_quick.yaml speed.decode_contexts=[128,512]",
            "hf-attn-swap eval --model ./my-model --perplexity.corpus notes.txt --no-passkey --threads 2",
        ],
    )
    p.add_argument("--threads", type=int, metavar="int",
                   help="torch threads for everything (sets eval_threads and speed.threads; default 1: stable "
                   "timings and the least contention on a small shared CPU)")
    p.add_argument("--no-passkey", action="store_true", help="skip the passkey probe (= passkey.enabled=false)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    extra = [f"eval_threads={args.threads}", f"speed.threads={args.threads}"] if args.threads is not None else []
    extra += ["passkey.enabled=false"] if args.no_passkey else []
    cfg = config_from_args(EvalConfig, args, extra)
    if args.print_config:
        echo(dump_yaml(cfg), end="")
        return 0
    from ..eval.compare import check_variants, run_comparison

    check_variants(cfg)  # unknown variants/options: one error line before anything else is said or loaded
    use_threads(cfg.eval_threads)
    if cfg.speed.threads != cfg.eval_threads:
        logger.info("timing on %s torch thread(s) (speed.threads)", cfg.speed.threads)
    records = run_comparison(cfg, overwrite=cfg.overwrite)
    for r in records:
        if r.get("status") != "ok":
            echo(f"{r['variant']}: {r['status']}: {r.get('reason')}")
    echo(f"wrote {cfg.out}/results.json, results.csv, results.md, pareto.png ({len(records)} variants)")
    return 0
