"""Uptrain a converted checkpoint: a thin script over ``hf_attn_swap.train`` (copy and modify freely).

    python recipes/uptrain.py --config recipes/configs/uptrain_smollm2_mqa.yaml [key=value ...]
    accelerate launch recipes/uptrain.py --config recipes/configs/uptrain_smollm2_mqa.yaml   # several GPUs
    accelerate launch --config_file recipes/configs/fsdp_2gpu.yaml recipes/uptrain.py --config ...   # sharded

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
    from accelerate import PartialState

    if a.results and PartialState().is_main_process:  # under accelerate launch every process returns the figures
        command = "python recipes/uptrain.py " + " ".join(sys.argv[1:] if argv is None else argv)
        out = result.to_dict()
        out["command"] = command
        out["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__}
        path = Path(a.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(out))
    return 0


def markdown(r: dict) -> str:
    lines = [f"`{r['command']}`", "", "| stage | held-out ppl | tokens so far | seconds so far |", "|---|---|---|---|",
             f"| original | {r['ppl_original']:.2f} | - | - |"]
    for c in r["curve"]:
        lines.append(f"| {c['stage']} | {c['ppl']:.2f} | {c['tokens']} | {c['seconds']:.0f} |")
    rec = r.get("recovery")
    lines += ["", f"Recovered share of the log-perplexity gap: {rec:.3f}" if rec is not None else "",
              f"Tokens: {r['tokens']}, seconds: {r['seconds']:.0f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
