#!/usr/bin/env python
"""Recipe: what does a model lose and gain when its attention is swapped?

    python recipes/eval_ppl_speed.py --config recipes/configs/eval_default.yaml
    python recipes/eval_ppl_speed.py --config recipes/configs/eval_quick.yaml perplexity.max_tokens=1024 speed.threads=2
    python recipes/eval_ppl_speed.py --config recipes/configs/eval_domains.yaml   # + perplexity on every corpus
    python recipes/eval_ppl_speed.py --help          # every option with its type and default

Options come from the same typed config as ``hf-attn-swap eval`` (:class:`hf_attn_swap.eval.config.EvalConfig`):
defaults < ``--config`` file < ``--option`` flags < trailing dotted ``key=value`` overrides, each value parsed by the
option's type (``variants`` also takes the list syntax ``baseline,gqa:groups=1,sliding_window:window=256``). The
recipe only calls the library (:mod:`hf_attn_swap.eval.compare`); copy it and change what you need. Outputs, in the
config's ``out`` directory: results.json, results.csv, results.md, pareto.png, run.json (config, environment, runtime).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from hf_attn_swap.cliconfig import add_config_arguments, config_from_args
from hf_attn_swap.eval.config import EvalConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML/JSON config (defaults: the built-in default run)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_config_arguments(parser, EvalConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    try:
        cfg = config_from_args(EvalConfig, args)
        from hf_attn_swap.eval.compare import run_comparison

        records = run_comparison(cfg)
    except ValueError as err:  # bad config or inputs (unknown key, empty corpus, unknown variant): one clear line
        print(f"eval_ppl_speed: error: {err}", file=sys.stderr)
        return 2
    for r in records:
        if r["status"] == "ok":
            print(f"{r['variant']:32s} ppl {r['perplexity']:10.3f}  decode {r['decode_tokens_per_s']:8.1f} tok/s  "
                  f"kv {r['kv_bytes'] / 2**20:7.2f} MiB  passkey {r.get('passkey_accuracy')}")
            if r.get("domain_ppl_ratio"):  # perplexity.domains: ratio to the baseline on each held-out text
                print("    per domain: " + ", ".join(f"{d} {v:.3g} ({x:.2f}x)" for (d, v), x in
                                                  zip(r["domain_perplexity"].items(), r["domain_ppl_ratio"].values())))
            if r.get("recovery") is not None:
                print(f"    recovery {r['recovery']:.3f}" + "".join(
                    f", {d} {'-' if v is None else f'{v:.3f}'}" for d, v in (r.get("domain_recovery") or {}).items()))
        else:
            print(f"{r['variant']:32s} {r['status']}: {r['reason']}")
    print(f"outputs in {cfg.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
