"""Typed, validated, JSON-serialisable option sets for attention variants.

Every variant declares a dataclass subclassing :class:`VariantConfig`. Validation happens twice: field-level in
``__post_init__`` (values that are wrong whatever the model) and model-level in :meth:`VariantConfig.check_model`
(values that are wrong for *this* model, e.g. groups that do not divide its heads). Both raise ``ValueError`` naming
what is allowed, before anything is changed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar


@dataclass
class VariantConfig:
    """Base class of every variant's options.

    Subclasses are plain dataclasses whose fields are JSON scalars (or lists of them), so that a swap can be written
    into a checkpoint's sidecar and restored exactly.
    """

    #: the registry name of the variant this config belongs to; set by each subclass.
    variant: ClassVar[str] = ""

    def check_model(self, model: Any, layers: list[int]) -> None:  # noqa: D401 - hook
        """Model-level validation; raise ``ValueError`` if these options cannot apply to ``model``'s ``layers``."""

    def requires_calibration(self) -> bool:
        """Whether applying these options needs ``calibration=`` model inputs (checked before anything changes)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (sorted keys when dumped)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> VariantConfig:
        """Build from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "(none)"
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for variant {cls.variant!r}; "
                f"its options are: {allowed}"
            )
        return cls(**options)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    #: allowed values of options with a fixed set (``{"strategy": ("mean", ...)}``), for ``hf-attn-swap variants``;
    #: a field's ``metadata["choices"]`` works too. ``__post_init__`` still does the checking.
    option_choices: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @classmethod
    def describe_options(cls) -> list[dict[str, Any]]:
        """One ``{name, type, default, allowed, help}`` row per option, read from the dataclass fields, their
        metadata and the ``Attributes:`` section of the class docstring."""
        from .cliconfig import _default, config_fields, help_of, type_name

        rows = []
        for f, tp in config_fields(cls):
            allowed = f.metadata.get("choices") or cls.option_choices.get(f.name)
            rows.append({"name": f.name, "type": type_name(tp), "default": _default(f),
                         "allowed": list(allowed) if allowed else None, "help": help_of(cls, f)})
        return rows


@dataclass
class NoOptions(VariantConfig):
    """Options of a variant that has none."""
