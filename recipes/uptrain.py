"""Uptrain a converted checkpoint: a thin script over ``hf_attn_swap.train`` (copy and modify freely).

    python recipes/uptrain.py --config recipes/configs/uptrain_smollm2_mqa.yaml [key=value ...]
    accelerate launch recipes/uptrain.py --config recipes/configs/uptrain_smollm2_mqa.yaml   # several GPUs

With ``--results PATH.json`` it also writes the measured figures (``ppl_original``, ``ppl_converted``,
``ppl_uptrained``, ``tokens``, ``seconds``, the recovery curve) and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import torch

from hf_attn_swap.readme import uptrain_table
from hf_attn_swap.train import UptrainConfig, uptrain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--resume", nargs="?", const=True, default=False)
    p.add_argument("--results", help="write the figures to this .json (and a .md beside it)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = UptrainConfig.load(a.config).override(a.overrides)
    result = uptrain(cfg, resume=a.resume)
    if a.results:
        command = "python recipes/uptrain.py " + " ".join(sys.argv[1:] if argv is None else argv)
        out = result.to_dict()
        out["command"] = command
        out["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__}
        path = Path(a.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(out, path.name))
    return 0


def markdown(r: dict, json_name: str) -> str:
    """The summary, marked as generated from ``json_name`` so ``python -m hf_attn_swap.readme --check`` keeps it
    equal to the JSON (prose added under it by hand stays as written)."""
    return f"<!-- generated: {json_name} uptrain_table -->\n{uptrain_table(r)}\n<!-- end generated -->\n"


if __name__ == "__main__":
    sys.exit(main())
