"""``hf-attn-swap <command>``: each command lives in ``hf_attn_swap/commands/<name>.py`` with ``register(sub)``.

Parsing (and ``--help``) imports neither torch nor transformers: each command's options are generated from its
torch-free config dataclass (:mod:`hf_attn_swap.cliconfig`), and torch is imported inside the command's ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import commands

logger = logging.getLogger("hf_attn_swap.cli")

EXAMPLES = """examples:
  hf-attn-swap variants                                   # every variant, its options, types, defaults
  hf-attn-swap convert --variant mqa:strategy=fit --out out/mqa
  hf-attn-swap eval --variants baseline,mqa:strategy=fit,sliding_window:window=256 --out out/eval
  hf-attn-swap eval --config recipes/configs/eval_quick.yaml perplexity.max_tokens=1024
  hf-attn-swap uptrain --config recipes/configs/uptrain_smollm2_mqa.yaml lr=1e-4
  hf-attn-swap <command> --help                           # every option with its type and default

Threads: convert, eval and uptrain run on 1 torch thread unless --threads says otherwise (measured best on a busy
2-core machine; on a dedicated one try the core count)."""


def echo(text: str = "", end: str = "\n") -> None:
    """The command line's output (results, paths, JSON summaries): the only place the package writes to stdout.
    Commands call this; progress and diagnostics go through ``logging``."""
    sys.stdout.write(text + end)


def use_threads(n: int | None) -> int:
    """Set torch's thread count for the whole command (None: keep torch's default) and say so once.

    Returns:
        The thread count in effect.
    """
    import torch

    if n is not None:
        torch.set_num_threads(n)
    n = torch.get_num_threads()
    logger.info("using %d torch thread(s); --threads to change", n)
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-attn-swap",
        description="Swap, convert and measure the attention of pretrained transformers models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from . import progress
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Bars are on in the command line (off in the library); log lines go through tqdm so they never break a bar.
    progress.enable(True)
    try:
        with logging_redirect_tqdm():
            return int(args.func(args) or 0)
    except (ValueError, TypeError) as err:  # bad input (ConfigError is a ValueError): one clear line, no traceback
        sys.stderr.write(f"hf-attn-swap {args.command}: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
