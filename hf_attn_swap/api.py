"""``swap_attention``: switch a loaded transformers model to another attention, in place.

A swap has up to two parts: a weight conversion (e.g. pooling K/V heads: lossy, cannot be undone) and an attention
function (selected through transformers' ``attn_implementation``, undone exactly). The model records every step in
``model.hf_attn_swap_record`` so that it can be saved (:mod:`.checkpoint`) and reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .base_attention import BASE_IMPL_ATTR
from .configs import VariantConfig
from .convert.adapters import get_adapter
from .convert.projections import find_attention
from .journal import transaction
from .hf_compat import attn_implementation, set_attn_implementation
from .registry import DISPATCHER_NAME, LAYER_ATTR, LayerSwap, get_variant, layer_swap

logger = logging.getLogger(__name__)

RECORD_ATTR = "hf_attn_swap_record"


@dataclass
class SwapStep:
    """One applied variant: what, with which options, on which layers, and what it did to the weights."""

    variant: str
    options: dict[str, Any]
    layers: list[int]
    lossy: bool = False
    vanilla: bool = False
    calibration_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SwapRecord:
    """Everything a model had applied, in order, and the attention implementation it started with."""

    original_attn_implementation: str
    steps: list[SwapStep] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_attn_implementation": self.original_attn_implementation,
            "steps": [s.to_dict() for s in self.steps],
        }


def swap_record(model: nn.Module) -> SwapRecord | None:
    """What :func:`swap_attention` applied to ``model`` (None if nothing)."""
    return getattr(model, RECORD_ATTR, None)


def parse_layers(spec: Any, num_layers: int) -> list[int]:
    """Layer selection -> sorted unique indices.

    Accepts None (all), an int, a ``range``/``slice``, an iterable of ints, or a string like ``"0-14"``,
    ``"0,2,4"`` or ``"16-"`` (inclusive ranges; an open end runs to the last layer). Negative ints count from the end.
    """
    allowed = f"layer indices 0..{num_layers - 1} (int, range, slice, list, or a string like '0-14,20')"
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, bool):
        raise ValueError(f"invalid layers {spec!r}; allowed: {allowed}")
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, slice):
        items = list(range(num_layers))[spec]
    elif isinstance(spec, str):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                try:
                    lo_i, hi_i = int(lo), (int(hi) if hi else num_layers - 1)
                except ValueError:
                    raise ValueError(f"invalid layers {spec!r}; allowed: {allowed}") from None
                items.extend(range(lo_i, hi_i + 1))
            else:
                try:
                    items.append(int(part))
                except ValueError:
                    raise ValueError(f"invalid layers {spec!r}; allowed: {allowed}") from None
    else:
        try:
            items = list(spec)
        except TypeError:
            raise ValueError(f"invalid layers {spec!r}; allowed: {allowed}") from None
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"invalid layer {i!r}; allowed: {allowed}")
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"layer {i} is out of range; allowed: {allowed}")
        out.append(j)
    if not out:
        raise ValueError(f"layers {spec!r} selects no layer; allowed: {allowed}")
    return sorted(set(out))


def _check_quantized(model: nn.Module) -> None:
    q = getattr(model, "hf_quantizer", None) or getattr(getattr(model, "config", None), "quantization_config", None)
    non_float = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if q is not None or getattr(model, "is_quantized", False) or non_float:
        what = type(q).__name__ if q is not None else f"non-float parameters ({non_float[0]}, ...)"
        raise ValueError(
            f"cannot swap the attention of a quantized model ({what}); load it in a float dtype "
            "(float32, bfloat16, float16) first and quantize after the swap"
        )


def _make_config(variant: Any, options: dict[str, Any]) -> VariantConfig:
    if isinstance(variant, VariantConfig):
        if options:
            raise ValueError(f"pass options either in the config object or as keywords, not both: {sorted(options)}")
        get_variant(type(variant).variant)
        return variant
    if isinstance(variant, tuple) and len(variant) == 2 and isinstance(variant[1], Mapping):
        variant, extra = variant
        options = {**extra, **options}
    if not isinstance(variant, str):
        raise TypeError(
            f"variant must be a name, a VariantConfig, or a (name, options) tuple; got {type(variant).__name__}"
        )
    spec = get_variant(variant)
    return spec.config_cls.from_dict(options)


def _plan(variant: Any, layers: Any, options: dict[str, Any], n: int) -> list[tuple[VariantConfig, list[int]]]:
    if isinstance(variant, Mapping):
        if layers is not None or options:
            raise ValueError("a per-layer plan carries its own layers and options; do not pass layers= or options too")
        plan, seen = [], {}
        for key, value in variant.items():
            idx = parse_layers(key, n)
            for i in idx:
                if i in seen:
                    raise ValueError(f"layer {i} is assigned twice in the plan ({seen[i]!r} and {key!r})")
                seen[i] = key
            plan.append((_make_config(value, {}), idx))
        if not plan:
            raise ValueError("empty per-layer plan")
        return plan
    return [(_make_config(variant, options), parse_layers(layers, n))]


def swap_attention(model: nn.Module, variant: Any, *, layers: Any = None, calibration: Any = None, **options: Any) -> nn.Module:
    """Switch ``model``'s attention to ``variant`` in place and return the model.

    The swap is one transaction: if anything raises (validation, a conversion, a variant's ``prepare``, a custom
    variant's hook, selecting the implementation), the model is rolled back to exactly what it was (weights and their
    identity, config fields, attention implementation, module classes and attributes, hooks, an earlier swap's
    record) and the original exception is re-raised (see :mod:`hf_attn_swap.journal`). Layers a swap does not touch
    keep the attention implementation the model was loaded with (eager, sdpa, ...).

    Time: attention-only variants swap instantly; ``gqa``/``mqa`` with ``strategy="fit"`` runs the calibration text
    through the model and a small solve per layer (SmolLM2-135M, 4096 tokens: about 33 s on one CPU thread). On a busy
    or small CPU torch's default thread count (one per core) can be much slower than one thread, because the threads
    wait for each other while other processes hold the cores: the same fit took 262-421 s with the default on a shared
    2-core machine. Call ``torch.set_num_threads(1)`` there (the result is the same). Progress bars, per calibration
    batch and per layer: ``hf_attn_swap.progress.enable()``.

    Args:
        model: a loaded transformers model of a supported ``model_type`` (see ``hf_attn_swap.convert.adapters``).
        variant: a registered name (``"gqa"``, ``"mqa"``, ...), a :class:`VariantConfig`, a ``(name, options)``
            tuple, or a per-layer plan: a mapping from layer selections (``"0-14"``, ``range(15)``, ``3``) to any of
            the former.
        layers: which layers (default all); see :func:`parse_layers`.
        calibration: model inputs for conversions that calibrate (``gqa`` with ``strategy="fit"``): a LongTensor of
            input ids ``(n, L)`` or a dict of model inputs.
        **options: the variant's options, e.g. ``groups=8, strategy="mean"``.

    Returns:
        The same model object.

    Raises:
        ValueError: unknown variant or option, options invalid for this model, unsupported architecture, quantized
            model. Nothing is changed when it (or anything else) raises.

    Example:
        >>> swap_attention(model, "gqa", groups=1, strategy="fit", calibration=ids)
        >>> swap_attention(model, {"0-14": ("sliding_window", {"window": 256}), "15-": "linear"})
    """
    with transaction(model):
        _check_quantized(model)
        sites = attention_sites(model)
        plan = _plan(variant, layers, options, len(sites))
        for cfg, idx in plan:
            cfg.check_model(model, idx)
            if calibration is None and cfg.requires_calibration():
                raise ValueError(
                    f"{type(cfg).variant} with {cfg.to_json()} needs calibration text: pass "
                    "calibration=<LongTensor of input ids (n, L)> (e.g. a few thousand tokens of held-in text)"
                )
        record = _apply_plan(model, plan, calibration=calibration)
        logger.info("%s", _summary(model, record, plan))  # one line per swap, whatever the number of layers
    return model


def _apply_plan(
    model: nn.Module,
    plan: list[tuple[VariantConfig, list[int]]],
    *,
    calibration: Any = None,
    structure_only: bool = False,
) -> SwapRecord:
    """Apply validated plan entries in order and record them (``structure_only``: shapes only, for loading).

    Not transactional by itself (:func:`swap_attention` wraps it; loading builds a fresh model). The record is a new
    object: an earlier swap's record is never edited in place, so a rollback restores it by putting it back.
    """
    old = swap_record(model)
    record = SwapRecord(
        original_attn_implementation=old.original_attn_implementation if old else attn_implementation(model),
        steps=list(old.steps) if old else [],
    )
    for cfg, idx in plan:
        spec = get_variant(type(cfg).variant)
        facts = _convert(model, spec, cfg, idx, calibration=calibration, structure_only=structure_only)
        if spec.prepare is not None:
            spec.prepare(model, cfg, idx)
        sites = attention_sites(model)  # a conversion may have replaced modules
        for i in idx:
            _attach_layer(sites[i].module, LayerSwap(variant=spec.name, config=cfg, layer_idx=i))
        record.steps.append(
            SwapStep(
                variant=spec.name,
                options=cfg.to_dict(),
                layers=idx,
                lossy=bool(facts.get("lossy", False)),
                vanilla=bool(facts.get("vanilla", False)),
                calibration_tokens=int(facts.get("calibration_tokens", 0)),
            )
        )
        logger.debug("applied %s to %d layer(s) with %s", spec.name, len(idx), cfg.to_json())
    setattr(model, RECORD_ATTR, record)
    _select_implementation(model, attention_sites(model), record.original_attn_implementation)
    return record


def _convert(model: nn.Module, spec: Any, cfg: VariantConfig, idx: list[int], *, calibration: Any,
             structure_only: bool) -> dict[str, Any]:
    """Run the variant's weight conversion, if it has one; returns its facts for the record."""
    if spec.convert is None:
        return {}
    kwargs: dict[str, Any] = {"structure_only": True} if structure_only else {}
    if calibration is not None:
        kwargs["calibration"] = calibration
    return spec.convert(model, cfg, idx, **kwargs) or {}


def _attach_layer(module: nn.Module, swap: LayerSwap) -> None:
    """Mark ``module`` as running ``swap`` (the dispatcher and the variant's function read it from there)."""
    setattr(module, LAYER_ATTR, swap)


def _select_implementation(model: nn.Module, sites: list, original: str) -> str:
    """Select the variant's implementation (one variant everywhere) or the per-layer dispatcher; returns it.

    With the dispatcher, modules no plan touched are told the implementation the model was loaded with, which the
    dispatcher runs for them (:mod:`.base_attention`).
    """
    names = {(layer_swap(s.module).variant if layer_swap(s.module) else None) for s in sites}
    impl = get_variant(names.pop()).impl_name if len(names) == 1 and None not in names else DISPATCHER_NAME
    if impl == DISPATCHER_NAME:
        base = original if original not in (None, DISPATCHER_NAME) else "sdpa"
        for s in sites:
            if layer_swap(s.module) is None:
                s.module.__dict__[BASE_IMPL_ATTR] = base
    set_attn_implementation(model, impl)
    return impl


def _layer_ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts, start = [], None
    for a, b in zip(idx, idx[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ",".join(parts)


def _summary(model: nn.Module, record: SwapRecord, plan: list[tuple[VariantConfig, list[int]]]) -> str:
    """The one INFO line a swap logs: what ran where, and what the other layers run."""
    n = len(attention_sites(model))
    steps = record.steps[-len(plan):]
    what = "; ".join(
        f"{s.variant} {json.dumps(s.options, sort_keys=True)} on layers {_layer_ranges(s.layers)}"
        + (" (weights converted, lossy)" if s.lossy else "")
        + (f" (calibrated on {s.calibration_tokens} tokens)" if s.calibration_tokens else "")
        for s in steps
    )
    swapped = sum(1 for s in attention_sites(model) if layer_swap(s.module) is not None)
    rest = "" if swapped == n else f"; the other {n - swapped} layer(s) keep {record.original_attn_implementation}"
    return (f"swap_attention: {what} ({swapped} of {n} layers swapped, attn_implementation "
            f"{attn_implementation(model)}{rest})")


def unswap_attention(model: nn.Module) -> nn.Module:
    """Undo every swap on ``model`` exactly; raises if a step changed the weights (that cannot be undone).

    Like :func:`swap_attention` it is one transaction: if a variant's ``restore`` raises, the model keeps its swap.

    Raises:
        ValueError: nothing to undo, or a lossy conversion (the message names it and says to reload the checkpoint).
    """
    record = swap_record(model)
    if record is None or not record.steps:
        raise ValueError("this model has no attention swap to undo")
    lossy = [s for s in record.steps if s.lossy]
    if lossy:
        s = lossy[0]
        raise ValueError(
            f"cannot undo {s.variant} {s.options} on layers {s.layers[0]}..{s.layers[-1]}: the conversion replaced "
            "the weights (e.g. merged K/V heads) and the originals are gone; reload the original checkpoint instead"
        )
    with transaction(model):  # a failing restore hook leaves the swap in place, not half undone
        adapter = get_adapter(model)
        for site in find_attention(model, adapter):
            if hasattr(site.module, LAYER_ATTR):
                delattr(site.module, LAYER_ATTR)
        for step in record.steps:
            spec = get_variant(step.variant)
            if spec.restore is not None:
                spec.restore(model, step.layers)
        for site in find_attention(model, adapter):
            site.module.__dict__.pop(BASE_IMPL_ATTR, None)
        set_attn_implementation(model, record.original_attn_implementation)
        delattr(model, RECORD_ATTR)
    return model


def attention_sites(model: nn.Module):
    """The model's attention modules in layer order (with heads, KV heads and head size)."""
    return find_attention(model, get_adapter(model))


def kv_heads_per_layer(model: nn.Module) -> list[int]:
    """Current number of KV heads of every layer."""
    return [s.num_kv_heads for s in attention_sites(model)]


__all__ = [
    "SwapRecord",
    "SwapStep",
    "attention_sites",
    "kv_heads_per_layer",
    "parse_layers",
    "swap_attention",
    "swap_record",
    "unswap_attention",
]
