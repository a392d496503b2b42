"""Variant specs written as text, for the command line and recipe configs.

``"gqa:groups=1,strategy=fit"`` is one variant with options; a list separates variants by commas too, so a token
that contains ``:`` or has no ``=`` starts a new variant: ``"baseline,gqa:groups=1,strategy=mean,sliding_window:window=256"``.
"""

from __future__ import annotations

from typing import Any


def coerce(value: str) -> Any:
    """``"1"`` -> 1, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, anything else stays a string."""
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value.strip()


def parse_variant_list(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse a comma-separated list of ``name[:key=value[,key=value...]]`` specs (see module docstring)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        if ":" in token:
            name, first = token.split(":", 1)
            out.append((name.strip(), {}))
            token = first
            if not token:
                continue
        elif "=" not in token:
            out.append((token, {}))
            continue
        if not out:
            raise ValueError(f"option {token!r} comes before any variant name in {text!r}")
        if "=" not in token:
            raise ValueError(f"expected key=value, got {token!r} in {text!r}")
        key, value = token.split("=", 1)
        out[-1][1][key.strip()] = coerce(value)
    if not out:
        raise ValueError(f"no variant in {text!r}; write e.g. 'gqa:groups=1,sliding_window:window=256'")
    return out


def format_variant(name: str, options: dict[str, Any]) -> str:
    """Inverse of one element of :func:`parse_variant_list`."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={v}" for k, v in options.items())
