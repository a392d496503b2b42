"""``hf-attn-swap <command>``: each command lives in ``hf_attn_swap/commands/<name>.py`` with ``register(sub)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import commands


def echo(text: str = "", end: str = "\n") -> None:
    """The command line's output (results, paths, JSON summaries): the only place the package writes to stdout.
    Commands call this; progress and diagnostics go through ``logging``."""
    sys.stdout.write(text + end)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-attn-swap",
        description="Swap, convert and measure the attention of pretrained transformers models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as err:  # bad input: one clear line, no traceback
        sys.stderr.write(f"hf-attn-swap {args.command}: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
