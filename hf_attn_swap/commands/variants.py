"""``hf-attn-swap variants``: list registered attention variants and their options."""

from __future__ import annotations

import argparse

from ..cli import echo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("variants", help="list the registered attention variants and their options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..registry import get_variant, list_variants

    for name in list_variants():
        spec = get_variant(name)
        opts = ", ".join(spec.config_cls.option_names()) or "-"
        echo(f"{name:16s} options: {opts}\n{'':16s} {spec.description}")
    return 0
