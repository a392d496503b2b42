"""``hf-attn-swap variants``: list registered attention variants with each option's type, default and allowed values."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..cli import echo
from ..cliconfig import add_config_command, check_fields, config_from_args, dump_yaml, opt


@dataclass
class VariantsConfig:
    """Options of ``hf-attn-swap variants``."""

    name: str | None = opt(None, help="show only this variant (null = all)")
    json: bool = opt(False, help="print JSON instead of a table")

    def __post_init__(self) -> None:
        check_fields(self)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_config_command(
        sub, "variants", VariantsConfig,
        help="list the registered attention variants and their options",
        description="List every registered attention variant (built-in and registered by plugins) with a one-line "
        "description and, per option, its type, default, allowed values and meaning, read from the variant's "
        "config dataclass. Use them in specs like gqa:groups=1,strategy=fit (convert --variant, eval --variants).",
        examples=[
            "hf-attn-swap variants",
            "hf-attn-swap variants --name sliding_window",
            "hf-attn-swap variants --json",
        ],
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(VariantsConfig, args)
    if args.print_config:
        echo(dump_yaml(cfg), end="")
        return 0
    from ..registry import get_variant, list_variants

    names = [get_variant(cfg.name).name] if cfg.name else list_variants()
    table = {n: {"description": get_variant(n).description, "options": get_variant(n).config_cls.describe_options()}
             for n in names}
    if cfg.json:
        echo(json.dumps(table, indent=2))
        return 0
    for name, info in table.items():
        echo(f"{name}: {info['description']}")
        if not info["options"]:
            echo("    (no options)")
        for o in info["options"]:
            allowed = f"; one of: {', '.join(map(str, o['allowed']))}" if o["allowed"] else ""
            echo(f"    {o['name']} ({o['type']}, default {json.dumps(o['default'])}{allowed})"
                 + (f": {o['help']}" if o["help"] else ""))
    return 0
