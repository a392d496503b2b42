"""Uptraining across domains: run each uptraining config, then report recovery per domain, held-out domain first.

    python recipes/uptrain_domains.py --config recipes/configs/domains.yaml

For every run named in the config it writes what ``recipes/uptrain.py --results`` writes (``results/<run>.json`` and
``.md``), then ``results/uptrain_domains.{json,md,png}``: per run and domain the perplexity after every stage, the
recovered share of the log-perplexity gap, passkey accuracy, the training CPU time, and the issue's goals checked by
code. ``--reuse`` trains nothing: it takes a run's JSON as it is when its config matches and leaves the other runs out
(to redraw the report).
Thin over :mod:`hf_attn_swap.train.domains`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "recipes/configs/domains.yaml"),
                   help="YAML: runs: [{name, config, results}], goals")
    p.add_argument("--out", default="results/uptrain_domains", help="report path without suffix")
    p.add_argument("--reuse", action="store_true", help="train nothing: report the runs whose results JSON holds "
                   "their current config, leave the others out (with a warning)")
    p.add_argument("--only", nargs="*", help="run only these run names (the others are reused)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hf_attn_swap.train.domains import DomainsError, run_domains

    command = "python recipes/uptrain_domains.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        run_domains(a.config, a.out, command=command, reuse=a.reuse, only=a.only)
    except DomainsError as err:
        print(f"uptrain_domains: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
