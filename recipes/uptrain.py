"""Uptrain a converted checkpoint: a thin script over ``hf_attn_swap.train`` (copy and modify freely).

    python recipes/uptrain.py --config recipes/configs/uptrain_smollm2_mqa.yaml [--option value ...] [key=value ...]
    accelerate launch recipes/uptrain.py --config recipes/configs/uptrain_smollm2_mqa.yaml   # several GPUs
    accelerate launch --config_file recipes/configs/fsdp_2gpu.yaml recipes/uptrain.py --config ...   # sharded

With ``--results PATH.json`` it also writes the measured figures (``ppl_original``, ``ppl_converted``,
``ppl_uptrained``, ``tokens``, ``seconds``, the recovery curve) and a Markdown summary beside it. Options are the
typed :class:`hf_attn_swap.train.UptrainConfig` (``--help`` lists them): defaults < ``--config`` < flags < overrides;
unknown keys are refused with the closest valid name.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hf_attn_swap.cliconfig import add_config_arguments, config_from_args
from hf_attn_swap.train.config import UptrainConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML/JSON UptrainConfig (recipes/configs/uptrain_*.yaml)")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="continue the run in output_dir")
    p.add_argument("--results", help="write the figures to this .json (and a .md beside it)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. tokens=32768 lr=1e-4")
    add_config_arguments(p, UptrainConfig)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(UptrainConfig, a)
    except ValueError as err:  # unknown key, wrong type: one clear line
        print(f"uptrain: error: {err}", file=sys.stderr)
        return 2
    from hf_attn_swap.train import uptrain

    result = uptrain(cfg, resume=a.resume)
    from accelerate import PartialState

    if a.results and PartialState().is_main_process:  # under accelerate launch every process returns the figures
        from hf_attn_swap.train.domains import write_run_results

        command = "python recipes/uptrain.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_run_results(result.to_dict(), a.results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
