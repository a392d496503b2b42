"""The registry of attention variants, wired into transformers' own hooks.

A variant is registered once under a name. Registration writes its attention function into transformers'
``AttentionInterface`` AND its mask function into ``AttentionMaskInterface``: a name with an attention function but no
mask function makes ``create_causal_mask`` return ``None``, and the model silently loses causality and padding.

Mask contract: every mask function here returns what ``sdpa_mask`` returns, a 4D boolean mask ``(b, 1, q, kv)``
(True = attend) or ``None`` when plain causality (bottom-right aligned) or no mask at all is exact. Every attention
function accepts that format, so one model-level mask serves layers with different variants (per-layer plans).

Per-layer options live on the attention modules (``module.hf_attn_swap``), never in call kwargs: ``generate()``
rejects unknown kwargs, and a copied per-module config would make transformers build masks in the wrong format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .base_attention import base_attention
from .configs import NoOptions, VariantConfig

logger = logging.getLogger(__name__)

#: attribute holding a :class:`LayerSwap` on every attention module a swap touched.
LAYER_ATTR = "hf_attn_swap"
#: the single dispatcher name used for per-layer plans that mix variants.
DISPATCHER_NAME = "hf_attn_swap"

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
ConvertFn = Callable[..., Any]


@dataclass
class LayerSwap:
    """What one attention module runs: the variant name, its options, and any per-layer state it keeps."""

    variant: str
    config: VariantConfig
    layer_idx: int
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VariantSpec:
    """A registered attention variant.

    Attributes:
        name: the name used with ``swap_attention`` and as a transformers ``attn_implementation``.
        config_cls: the dataclass of its options.
        attention_fn: ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kw)`` returning
            ``(out (b, q, H, d), weights_or_None)``.
        mask_fn: a transformers mask-interface function (defaults to :func:`default_mask`).
        convert: optional weight surgery ``convert(model, config, layers, *, calibration=None, structure_only=False)
            -> dict`` (facts: ``lossy``, ``vanilla``, ``calibration_tokens``); applied once by ``swap_attention``
            before the attention function is selected. ``structure_only`` only reshapes (checkpoint loading).
            It must assign new tensors rather than write into the model's: a failing swap is rolled back by putting
            the old objects back (:mod:`.journal`), which cannot undo an in-place write (it is logged as an error).
        prepare: optional ``prepare(model, config, layers) -> None`` that attaches per-layer state (attention-only
            variants with learnable or recurrent state).
        restore: optional ``restore(model, layers) -> None`` undoing what ``prepare`` did (used by unswap).
        vanilla_export: optional ``vanilla_export(model, step) -> PretrainedConfig | (PretrainedConfig, state_dict)
            | None``: a config of a vanilla transformers family that runs this swap exactly, with the model's state
            dict as is or the state dict given (e.g. a llama with a sliding window saved as Mistral, a GPT-2 MQA as
            GPT-BigCode); None when there is none. Used by ``save_swapped`` for steps whose own family cannot say it.
        description: one line for ``list_variants``.
    """

    name: str
    config_cls: type[VariantConfig]
    attention_fn: AttentionFn
    mask_fn: Callable[..., Any]
    convert: ConvertFn | None = None
    prepare: Callable[..., Any] | None = None
    restore: Callable[..., Any] | None = None
    vanilla_export: Callable[..., Any] | None = None
    description: str = ""

    @property
    def impl_name(self) -> str:
        """The name transformers sees as ``attn_implementation`` (see :func:`implementation_name`)."""
        return implementation_name(self.name)


def implementation_name(name: str) -> str:
    """The transformers-facing name of a variant.

    transformers treats every ``attn_implementation`` containing "flash" as a FlashAttention request
    (``is_flash_attention_requested`` is a substring test) and tries to load a flash kernel for it, so such names are
    registered with "flash" spelled "io_aware" ("flash" -> "io_aware"). Every other name is used as is.
    """
    return name.replace("flash", "io_aware")


_REGISTRY: dict[str, VariantSpec] = {}


def default_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA-format mask (4D bool or None); the format every variant's attention function accepts."""
    return sdpa_mask(*args, **kwargs)


def _check_name(name: str) -> None:
    # transformers treats names with "/" or ":" as Hub kernels and reserves the "paged|" prefix.
    if not name or not isinstance(name, str) or "/" in name or ":" in name or name.startswith("paged"):
        raise ValueError(
            f"invalid variant name {name!r}: use a non-empty name without '/' or ':' and not starting with 'paged' "
            "(transformers reads those as Hub kernels or paged attention)"
        )
    if name in ("sdpa", "eager", "flex_attention", DISPATCHER_NAME) or name.startswith("flash_attention_"):
        raise ValueError(f"variant name {name!r} would shadow a transformers built-in attention implementation")


def register_variant(
    name: str,
    attention_fn: AttentionFn | None = None,
    *,
    config: type[VariantConfig] = NoOptions,
    mask_fn: Callable[..., Any] | None = None,
    convert: ConvertFn | None = None,
    prepare: Callable[..., Any] | None = None,
    restore: Callable[..., Any] | None = None,
    vanilla_export: Callable[..., Any] | None = None,
    description: str = "",
    overwrite: bool = False,
):
    """Register an attention variant (call form, or decorator on its attention function).

    Example:
        >>> @register_variant("scaled_sdpa", config=MyConfig)
        ... def scaled_sdpa(module, query, key, value, attention_mask, scaling=None, **kw): ...

    Args:
        name: registry and transformers name; no ``/`` or ``:``.
        attention_fn: the attention function; omit to use the decorator form.
        config: the options dataclass (a :class:`VariantConfig` subclass). A class another variant already owns
            (e.g. ``GQAConfig``) is never changed: the variant gets a subclass of it (``spec.config_cls``).
        mask_fn: the mask function; defaults to SDPA-format masks. Never left out: see the module docstring.
        convert: optional weight surgery.
        prepare: optional per-layer state set-up.
        restore: optional undo of ``prepare``.
        vanilla_export: optional vanilla-config export (see :class:`VariantSpec`).
        description: one line shown by :func:`list_variants`.
        overwrite: allow replacing an existing registration.

    Returns:
        The :class:`VariantSpec` (call form) or the decorated function (decorator form).
    """
    _check_name(name)
    if not (isinstance(config, type) and issubclass(config, VariantConfig)):
        raise TypeError(f"config must be a VariantConfig subclass, got {config!r}")

    def _register(fn: AttentionFn) -> VariantSpec:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"variant {name!r} is already registered; pass overwrite=True to replace it")
        if not callable(fn):
            raise TypeError(f"attention_fn of {name!r} must be callable")
        config_cls = _config_class_for(name, config)
        spec = VariantSpec(
            name=name,
            config_cls=config_cls,
            attention_fn=fn,
            mask_fn=mask_fn or default_mask,
            convert=convert,
            prepare=prepare,
            restore=restore,
            vanilla_export=vanilla_export,
            description=description or _first_line(fn.__doc__),
        )
        _REGISTRY[name] = spec
        # Both hooks, through their classmethods so every model instance sees them.
        AttentionInterface.register(spec.impl_name, fn)
        AttentionMaskInterface.register(spec.impl_name, spec.mask_fn)
        logger.debug("registered attention variant %s", name)
        return spec

    if attention_fn is None:
        def decorator(fn: AttentionFn) -> AttentionFn:
            _register(fn)
            return fn

        return decorator
    return _register(attention_fn)


def _config_class_for(name: str, config: type[VariantConfig]) -> type[VariantConfig]:
    """The options class variant ``name`` owns: ``config`` itself if no variant owns it yet, else a subclass.

    A config class names its variant (``GQAConfig.variant == "gqa"``) and ``swap_attention(model, GQAConfig(...))``
    runs that variant. Rewriting the attribute of a class another variant owns would silently reroute that variant's
    configs (``GQAConfig`` objects would run the new variant and skip gqa's weight conversion), and the shared
    :class:`NoOptions` would name whichever option-less variant came last. Such classes get a subclass instead, with
    the same fields and validation, owned by ``name``.
    """
    owner = config.__dict__.get("variant", "")  # own attribute only: a user subclass of GQAConfig owns nothing yet
    if owner == name or (not owner and config not in (VariantConfig, NoOptions)):
        config.variant = name
        return config
    label = f"{config.__name__}[{name}]"  # repr shows both: GQAConfig[my_gqa](groups=2, ...)
    derived = type(label, (config,), {"variant": name, "__module__": config.__module__, "__qualname__": label,
                                       "__doc__": config.__doc__})
    logger.debug("variant %s: %s belongs to %r, using a subclass", name, config.__name__, owner or "no variant")
    return dataclass(derived)


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def get_variant(name: str) -> VariantSpec:
    """The registered variant called ``name``; ``ValueError`` listing the known ones otherwise."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention variant {name!r}; known variants: {', '.join(list_variants())}") from None


def list_variants() -> list[str]:
    """Names of all registered variants, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def layer_swap(module: torch.nn.Module) -> LayerSwap | None:
    """The :class:`LayerSwap` a swap attached to ``module``, if any."""
    return getattr(module, LAYER_ATTR, None)


def _dispatch_attention(module: torch.nn.Module, *args: Any, **kwargs: Any):
    """Per-layer plans: run the variant recorded on this module; modules no plan touched run the implementation the
    model was loaded with (:mod:`.base_attention`)."""
    swap = layer_swap(module)
    if swap is None:
        return base_attention(module, *args, **kwargs)
    return _REGISTRY[swap.variant].attention_fn(module, *args, **kwargs)


_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    # Importing the variants package registers the built-in variants exactly once.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from . import variants  # noqa: F401


AttentionInterface.register(DISPATCHER_NAME, _dispatch_attention)
AttentionMaskInterface.register(DISPATCHER_NAME, default_mask)
