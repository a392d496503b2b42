"""Pre-train the small MHA llama decoder: a thin script over ``hf_attn_swap.train.pretrain`` (copy and modify freely).

    python recipes/pretrain_mha.py --config recipes/configs/pretrain_mha.yaml --results results/pretrain_mha.json

The checkpoint goes to ``<cache>/models/<name>`` (``hf_attn_swap.zoo.load_model(name)`` loads it). With ``--results
PATH.json`` the figures (held-out perplexity per corpus and its curve, tokens, FLOPs, CPU seconds, provenance) are
also written there, with a Markdown summary and a plot of the curve beside it. Options are the typed
:class:`hf_attn_swap.train.pretrain.PretrainConfig` (``--help`` lists them); unknown keys are refused with the closest
valid name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hf_attn_swap.cliconfig import add_config_arguments, config_from_args
from hf_attn_swap.train.pretrain import PretrainConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML/JSON PretrainConfig (recipes/configs/pretrain_*.yaml)")
    p.add_argument("--results", help="write the figures to this .json (and a .md and .png beside it)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. tokens=65536 seed=1")
    add_config_arguments(p, PretrainConfig)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hf_attn_swap.train.pretrain import pretrain, report

    try:
        cfg = config_from_args(PretrainConfig, a)
        result = pretrain(cfg)
    except ValueError as err:  # bad option, vocabulary, corpus, existing checkpoint: one line, nothing trained
        print(f"pretrain_mha: error: {err}", file=sys.stderr)
        return 2
    if a.results:
        report(result, Path(a.results))
    print(json.dumps({"path": result.path, "ppl": result.ppl, "tokens": result.tokens, "cpu_seconds":
                      round(result.cpu_seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
