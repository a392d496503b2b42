"""``hf-attn-swap eval``: perplexity, speed, KV memory and passkey of a model's attention variants vs the baseline."""

from __future__ import annotations

import argparse
import logging

from ..cli import echo

logger = logging.getLogger(__name__)

#: command-line flag -> dotted config key
_FLAGS = {
    "model": "model",
    "variants": "variants",
    "out": "out",
    "dtype": "dtype",
    "device": "device",
    "missing": "missing",
    "corpus": "perplexity.corpus",
    "split": "perplexity.split",
    "max_tokens": "perplexity.max_tokens",
    "context": "perplexity.context",
    "stride": "perplexity.stride",
    "batch_size": "perplexity.batch_size",
    "threads": "speed.threads",
    "eval_threads": "eval_threads",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare attention variants: perplexity, prefill/decode speed, KV bytes, passkey (json/csv/md/png)",
        description=(
            "Evaluate the unconverted model and each variant (applied to a fresh copy): strided perplexity "
            "(token, bits/byte, word), prefill latency and cached decode tokens/s, KV-cache bytes (measured and "
            "analytic), peak memory, passkey retrieval. Writes DIR/results.json, results.csv, results.md, "
            "pareto.png and run.json. Precedence: defaults < --config YAML < flags < --set."
        ),
    )
    p.add_argument("--config", help="YAML config (see recipes/configs/eval_default.yaml)")
    p.add_argument("--model", help="short name (smollm2-135m) or local model directory")
    p.add_argument("--variants", help="e.g. 'gqa:groups=1,sliding_window:window=256' (baseline is always added)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that holds no previous results (its files are left alone)")
    p.add_argument("--corpus", help="corpus name (shakespeare, kjv, sotu, wikitext-2) or a .txt file/directory")
    p.add_argument("--split", choices=["train", "validation", "all"], help="corpus split for perplexity")
    p.add_argument("--max-tokens", type=int, help="perplexity tokens")
    p.add_argument("--context", type=int, help="perplexity window length")
    p.add_argument("--stride", type=int, help="perplexity window stride (default: context)")
    p.add_argument("--batch-size", type=int, help="perplexity windows per forward")
    p.add_argument("--threads", type=int, help="torch threads while timing (default 1)")
    p.add_argument("--eval-threads", type=int, help="torch threads for perplexity/passkey (default: torch's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--missing", choices=["skip", "error"], help="unregistered variants: record and skip, or fail")
    p.add_argument("--no-passkey", action="store_true", help="skip the passkey probe")
    p.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set speed.decode_contexts=[128,512])")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The flags that were given, as dotted overrides (then ``--set`` items, which win)."""
    out = []
    for flag, key in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if args.no_passkey:
        out.append("passkey.enabled=false")
    if args.no_plot:
        out.append("plot=false")
    if args.progress:
        out.append("progress=true")
    return out + list(args.set)


def run(args: argparse.Namespace) -> int:
    from ..eval.compare import load_config, run_comparison

    try:
        cfg = load_config(args.config, overrides_from_args(args))
    except FileNotFoundError as err:
        raise ValueError(f"config file not found: {err.filename}") from None
    records = run_comparison(cfg, overwrite=args.overwrite)
    for r in records:
        if r.get("status") != "ok":
            echo(f"{r['variant']}: {r['status']}: {r.get('reason')}")
    echo(f"wrote {cfg.out}/results.json, results.csv, results.md, pareto.png ({len(records)} variants)")
    return 0
