"""One config system for every command and recipe: typed dataclasses loaded from YAML/JSON, ``key=value`` overrides
parsed by each field's type, one set of validators, and argparse options (with ``--help``) generated from the fields.

A config is a plain dataclass whose fields carry ``metadata={"help": ...}`` (the ``HfArgumentParser`` convention);
:func:`opt` builds such a field and can add ``choices``, ``min``/``max`` (inclusive), ``gt`` (exclusive lower bound)
and ``parse`` (a custom text parser). A field whose type is another dataclass is a section: ``perplexity.context``
in overrides, ``--perplexity.context`` on the command line, a nested mapping in YAML. Precedence, lowest first:
defaults < ``--config`` file < flags < ``key=value`` overrides.

Why this module and not ``HfArgumentParser`` or OmegaConf: ``HfArgumentParser`` imports transformers (and torch,
about a second), and ``hf-attn-swap --help`` must not import either. OmegaConf would cover loading and merging but
not the generated ``--help``, and it would be a new dependency for what a few hundred lines of standard library do here. This module imports
only the standard library (PyYAML when a YAML file or a mapping value is read).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: argparse ``dest`` prefix of generated options, so they can be told apart from a command's own arguments.
DEST_PREFIX = "cfg:"
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config is invalid: unknown key, wrong type, impossible value, unreadable file."""


def opt(
    default: Any = _MISSING,
    *,
    help: str,  # noqa: A002 - the HfArgumentParser metadata key
    default_factory: Callable[[], Any] | Any = _MISSING,
    choices: Sequence[Any] | None = None,
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    gt: float | None = None,
    parse: Callable[[str], Any] | None = None,
    aliases: Sequence[str] = (),
    allow_empty: bool = False,
) -> Any:
    """A dataclass field with its help text and the checks :func:`check_fields` applies.

    Args:
        default: the default value (or give ``default_factory`` for lists/dicts).
        help: one line for ``--help``.
        default_factory: builds a mutable default.
        choices: allowed values (for a list field: allowed elements).
        min: inclusive lower bound (numbers, or every element of a list of numbers).
        max: inclusive upper bound.
        gt: exclusive lower bound (``gt=0``: positive).
        parse: turns command-line text into the value (instead of parsing by type).
        aliases: extra command-line flags (without ``--``), e.g. a short form of a section's option.
        allow_empty: a list field may be empty (``[]`` means "none", e.g. no held-out domain).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max, "gt": gt,
            "parse": parse, "aliases": tuple(aliases), "allow_empty": allow_empty}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------------
# types
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, resolved type)`` of every init field of the dataclass ``cls``."""
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
        raise TypeError(f"config fields support X or X | None, not {tp}")
    return tp, False


def is_section(tp: Any) -> bool:
    """Whether a field of type ``tp`` is a nested config section (a dataclass)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """``int``, ``float | null``, ``list[int]``, ``mapping``... as shown in ``--help`` and in errors."""
    base, optional = _split_optional(tp)
    origin = typing.get_origin(base)
    if base is Any:
        name = "any"
    elif origin in (list, tuple, Sequence):
        name = f"list[{type_name(typing.get_args(base)[0])}]" if typing.get_args(base) else "list"
    elif origin in (dict, Mapping) or base is dict:
        name = "mapping"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} | null" if optional else name


def _bad(key: str, tp: Any, value: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"{key} must be {type_name(tp)}{extra}, got {value!r}")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_text(text: str, tp: Any, key: str, parse: Callable[[str], Any] | None = None) -> Any:
    """Command-line text -> a value of type ``tp``, by the type (``"1e-4"`` for a float field is 0.0001;
    ``"[1,2]"`` or ``"1,2"`` for ``list[int]``; ``null``/``none`` for an optional field; YAML flow syntax for mappings).

    Raises:
        ConfigError: the text is not a value of that type.
    """
    text = text.strip()
    base, optional = _split_optional(tp)
    if optional and text.lower() in ("null", "none"):
        return None
    if parse is not None:
        try:
            return parse(text)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    origin = typing.get_origin(base)
    if base is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise _bad(key, tp, text, " (true or false)")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise _bad(key, tp, text) from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise _bad(key, tp, text) from None
    if base is str:
        return text
    if origin in (list, tuple, Sequence):
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        (elem,) = typing.get_args(base) or (Any,)
        return [parse_text(t, elem, f"{key}[{i}]") for i, t in enumerate(inner.split(",")) if t.strip()]
    # mappings and Any: YAML flow syntax ({strategy: fit}), the one place where YAML decides the type
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: not a valid value ({err.__class__.__name__}): {text!r}") from None
    return convert(value, tp, key)


def convert(value: Any, tp: Any, key: str, field: dataclasses.Field | None = None) -> Any:
    """Check (and where lossless, convert) a value from a file or from Python against the field type ``tp``.

    Integers become floats for float fields; text is parsed by :func:`parse_text` (YAML 1.1 reads ``1e-4`` as text);
    a single value becomes a one-element list for list fields; mappings become section dataclasses.

    Raises:
        ConfigError: the value is not of that type.
    """
    base, optional = _split_optional(tp)
    if value is None:
        if optional or base is Any:
            return None
        raise _bad(key, tp, value)
    if isinstance(value, str) and base is not str and base is not Any and not is_section(base):
        return parse_text(value, tp, key, field.metadata.get("parse") if field is not None else None)
    if base is Any:
        return value
    if is_section(base):
        if isinstance(value, base):
            return value
        return from_dict(base, value, key)
    origin = typing.get_origin(base)
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple, Sequence):
        (elem,) = typing.get_args(base) or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [convert(v, elem, f"{key}[{i}]") for i, v in enumerate(items)]
    elif origin in (dict, Mapping) or base is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise _bad(key, tp, value)


def check_fields(obj: Any, where: str = "") -> None:
    """Validate every field of the config dataclass ``obj`` in place: type (converted as :func:`convert` does),
    ``choices``, ``min``/``max``/``gt`` and non-empty lists. Call it first in ``__post_init__``.

    Raises:
        ConfigError: naming the key, what it must be and what it got.
    """
    for f, tp in config_fields(type(obj)):
        key = f"{where}.{f.name}" if where else f.name
        value = convert(getattr(obj, f.name), tp, key, f)
        setattr(obj, f.name, value)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value and not f.metadata.get("allow_empty"):
            raise ConfigError(f"{key} must be a non-empty {type_name(tp)}, got []")
        meta = f.metadata
        if meta.get("choices") is not None and any(v not in meta["choices"] for v in items):
            allowed = ", ".join(map(str, meta["choices"]))
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
        lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
        for v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if (lo is not None and v < lo) or (hi is not None and v > hi) or (gt is not None and v <= gt):
                    raise ConfigError(f"{key} must be {type_name(tp)} {_range(lo, hi, gt)}, got {value!r}")


def _range(lo: float | None, hi: float | None, gt: float | None) -> str:
    parts = ([f">= {lo:g}"] if lo is not None else []) + ([f"> {gt:g}"] if gt is not None else [])
    parts += [f"<= {hi:g}"] if hi is not None else []
    return " and ".join(parts)


def docstring_attributes(cls: type) -> dict[str, str]:
    """The Google-style ``Attributes:`` section of ``cls``'s docstring as ``{name: one-line text}`` (the help of
    dataclasses that document their fields there instead of in ``metadata["help"]``)."""
    import inspect

    out: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    indent, name = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next section
        indent = depth if indent is None else indent
        head, sep, text = line.strip().partition(":")
        if depth == indent and sep and head.isidentifier():
            name = head
            out[name] = text.strip()
        elif name is not None:
            out[name] += " " + line.strip()
    return out


def help_of(cls: type, f: dataclasses.Field) -> str:
    """A field's help: ``metadata["help"]``, else its entry in the class docstring's ``Attributes:`` section."""
    text = f.metadata.get("help") or docstring_attributes(cls).get(f.name, "")
    return text.replace("``", "")  # reST literals read badly on a terminal


# ---------------------------------------------------------------------------------------------------------------------
# loading and overrides
# ---------------------------------------------------------------------------------------------------------------------


def _unknown(key: str, where: str, known: Sequence[str]) -> ConfigError:
    full = f"{where}.{key}" if where else key
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {full!r}{hint}; allowed in {where or 'the top level'}: {', '.join(known)}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build the config dataclass ``cls`` from a mapping, refusing unknown keys with the closest valid name.

    Raises:
        ConfigError: unknown key, wrong type or invalid value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'a config'} must be a mapping of keys, got {type(data).__name__}")
    fields = {f.name: (f, tp) for f, tp in config_fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise _unknown(str(key), where, list(fields))
        f, tp = fields[name]
        kwargs[name] = convert(value, tp, f"{where}.{name}" if where else name, f)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a class's own cross-field check
        raise ConfigError(str(err)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as plain data (sections as nested dicts), ready for JSON/YAML and :func:`from_dict`."""
    return dataclasses.asdict(obj)


def resolve_key(cls: type, key: str) -> tuple[list[str], Any, dataclasses.Field | None]:
    """``"perplexity.max-tokens"`` -> (``["perplexity", "max_tokens"]``, its type, its field).

    A key inside a mapping field (``variant_options.strategy``) resolves to type ``Any``.

    Raises:
        ConfigError: an unknown key, with the closest valid name.
    """
    parts = [p.strip().replace("-", "_") for p in key.split(".")]
    node: Any = cls
    where: list[str] = []
    for i, part in enumerate(parts):
        fields = {f.name: (f, tp) for f, tp in config_fields(node)}
        if part not in fields:
            err = _unknown(part, ".".join(where), list(fields))
            sections = [n for n, (_, tp) in fields.items() if is_section(tp)]
            if i < len(parts) - 1 and not where:
                err = ConfigError(f"{err}; {part!r} is not a section (sections: {', '.join(sections) or 'none'})")
            raise err
        f, tp = fields[part]
        where.append(part)
        if i == len(parts) - 1:
            return parts, tp, f
        base, _ = _split_optional(tp)
        if is_section(base):
            node = base
            continue
        if typing.get_origin(base) in (dict, Mapping) or base is dict:
            if i + 2 != len(parts):
                raise ConfigError(f"override {key!r}: only one key below the mapping {'.'.join(where)!r}")
            return parts, Any, None
        raise ConfigError(f"override {key!r}: {'.'.join(where)!r} is a {type_name(tp)}, not a section")
    raise AssertionError("unreachable")


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` / ``section.key=value`` overrides to the plain config data ``data`` (a new dict).

    Each value is parsed by its field's type (:func:`parse_text`), not guessed.

    Raises:
        ConfigError: not ``key=value``, unknown key (with the closest name), a value of the wrong type.
    """
    import copy

    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. seed=1, section.key=value)")
        parts, tp, f = resolve_key(cls, key.strip())
        value = parse_text(raw, tp, ".".join(parts), f.metadata.get("parse") if f is not None else None)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):  # a section absent from the file, or already a dataclass/None
                child = to_dict(child) if dataclasses.is_dataclass(child) else {}
                node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """A ``.json`` or YAML config file as a mapping.

    Raises:
        ConfigError: the file is missing, unreadable, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def load(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """Defaults < the file at ``path`` (YAML or JSON; None = defaults only) < ``overrides``; validated.

    Raises:
        ConfigError: see :func:`read_file`, :func:`apply_overrides`, :func:`from_dict`.
    """
    data = read_file(path) if path is not None else {}
    return from_dict(cls, apply_overrides(cls, data, overrides))


def dump_yaml(obj: Any) -> str:
    """A config as YAML (keys in field order), loadable again by :func:`load`."""
    import yaml

    return yaml.safe_dump(to_dict(obj), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def describe(f: dataclasses.Field, tp: Any) -> str:
    """``help [type; default: X; one of: a, b]`` for one field."""
    meta = f.metadata
    default = _default(f)
    bits = [type_name(tp)]
    if not is_section(_split_optional(tp)[0]):
        bits.append(f"default: {_show(default)}" if default is not _MISSING else "required")
    if meta.get("choices"):
        bits.append("one of: " + ", ".join(map(_show, meta["choices"])))
    if any(meta.get(k) is not None for k in ("min", "max", "gt")):
        bits.append(_range(meta.get("min"), meta.get("max"), meta.get("gt")))
    return f"{meta.get('help', '')} [{'; '.join(bits)}]".strip()


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--option`` per field of ``cls`` (``--section.option`` for nested sections), every one listed in
    ``--help`` with its type, default and help. Values stay text until :func:`overrides_from_args` hands them to
    the one typed parser; an option not given is absent (``argparse.SUPPRESS``), so a ``--config`` file wins over
    the defaults and a flag over the file."""
    title = f"{prefix.rstrip('.')} options" if prefix else "options (defaults < --config file < flags < KEY=VALUE)"
    doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()) if prefix else None
    group = parser.add_argument_group(title, (doc or "").replace("%", "%%") or None)
    sections = []
    for f, tp in config_fields(cls):
        base, _ = _split_optional(tp)
        if is_section(base):
            sections.append((f, base))
            continue
        key = prefix + f.name
        dashed = "--" + key.replace("_", "-")
        flags = [dashed] + ["--" + a.replace("_", "-") for a in f.metadata.get("aliases", ())]
        helptext = describe(f, tp).replace("%", "%%")
        dest = DEST_PREFIX + key
        if base is bool:  # --flag / --no-flag: a flag that takes no value cannot swallow a trailing KEY=VALUE
            group.add_argument(*flags, dest=dest, action="store_const", const="true", default=argparse.SUPPRESS,
                               help=helptext)
            group.add_argument("--no-" + dashed[2:], dest=dest, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=f"{key}=false")
        else:
            group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, metavar=type_name(tp).replace(" ", ""),
                               help=helptext)
        if "_" in key:  # the spelling used in YAML files and overrides also works as a flag (not listed twice)
            group.add_argument("--" + key, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                               **({"action": "store_const", "const": "true"} if base is bool else {}))
    for f, sub in sections:
        add_config_arguments(parser, sub, prefix + f.name + ".")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The generated options that were given, as ``key=value`` overrides."""
    return [f"{k[len(DEST_PREFIX):]}={v}" for k, v in vars(args).items() if k.startswith(DEST_PREFIX)]


def add_config_command(
    sub: Any, name: str, cls: type, *, help: str, description: str, examples: Sequence[str]  # noqa: A002
) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of ``cls``, plus ``--config FILE``, ``--print-config`` and
    trailing ``KEY=VALUE`` overrides; ``examples`` become the help's epilog."""
    import textwrap

    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    description = textwrap.fill(" ".join(description.split()), width=100)
    p = sub.add_parser(name, help=help, description=description.replace("%", "%%"), epilog=epilog.replace("%", "%%"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config file (unknown keys are refused)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="same as a trailing KEY=VALUE")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted for sections (e.g. seed=1 perplexity.context=256)")
    add_config_arguments(p, cls)
    return p


def config_from_args(cls: type, args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    """Resolve a command's config: defaults < ``--config`` < ``extra`` < flags < ``--set``/trailing overrides."""
    overrides = [*extra, *overrides_from_args(args), *getattr(args, "set", []), *getattr(args, "overrides", [])]
    return load(cls, getattr(args, "config", None), overrides)


__all__ = [
    "ConfigError",
    "add_config_arguments",
    "add_config_command",
    "apply_overrides",
    "check_fields",
    "config_fields",
    "config_from_args",
    "convert",
    "describe",
    "docstring_attributes",
    "help_of",
    "dump_yaml",
    "from_dict",
    "load",
    "opt",
    "overrides_from_args",
    "parse_text",
    "read_file",
    "resolve_key",
    "to_dict",
    "type_name",
]
