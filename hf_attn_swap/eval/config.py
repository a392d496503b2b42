"""The comparison recipe's config (``hf-attn-swap eval``, ``recipes/eval_ppl_speed.py``): what to measure, typed and
validated, importable without torch so that ``hf-attn-swap eval --help`` stays fast.

    cfg = load_config("recipes/configs/eval_default.yaml", ["perplexity.max_tokens=2048"])

The run itself is :func:`hf_attn_swap.eval.compare.run_comparison`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import cliconfig
from ..cliconfig import ConfigError, check_fields, opt

BASELINE = "baseline"

DEFAULT_VARIANTS: list[str] = [
    "baseline",
    "mqa:strategy=mean",
    "mqa:strategy=first",
    "mqa:strategy=random",
    "mqa:strategy=fit",
    "sliding_window:window=256",
    "linear",
    "linear:feature_map=hedgehog,window=64",
    "flash",
]

DTYPES = ("float32", "bfloat16", "float16")
#: passkey prompt formats (hf_attn_swap.eval.passkey reads them from here)
PASSKEY_FORMATS = ("plain", "chat")


def parse_variants(text: str) -> list[str]:
    """``"baseline,gqa:groups=1,strategy=fit,linear"`` -> ``["baseline", "gqa:groups=1,strategy=fit", "linear"]``."""
    from ..specs import format_variant, parse_variant_list

    return [format_variant(n, o) for n, o in parse_variant_list(text)]


@dataclass
class PerplexitySection:
    """Perplexity: strided windows over the first max_tokens tokens of the corpus split."""

    corpus: str = opt("shakespeare", aliases=("corpus",), help=(
        "corpus name (shakespeare, kjv, sotu, austen, moby-dick, python-docs, jargon, devils-dictionary; wikitext-2 "
        "where the Hub answers) or a local .txt file / directory"))
    split: str = opt("validation", choices=("validation", "train", "all"), aliases=("split",),
                     help="corpus split scored for perplexity")
    max_tokens: int | None = opt(4096, min=2, aliases=("max_tokens",), help="tokens evaluated (null = whole split)")
    context: int = opt(512, min=2, aliases=("context",), help="window length in tokens")
    stride: int | None = opt(None, min=1, aliases=("stride",),
                             help="new tokens scored per window (null = context: consecutive windows share one token)")
    batch_size: int = opt(4, min=1, aliases=("batch_size",), help="windows per forward")
    domains: list[str] = opt(default_factory=list, allow_empty=True, aliases=("domains",), help=(
        "more held-out texts: corpus names (hf_attn_swap.data.list_corpora()) or .txt files / directories; every "
        "variant's perplexity on each one's VALIDATION split, same context, stride and max_tokens (empty = none)"))

    def __post_init__(self) -> None:
        check_fields(self, "perplexity")
        if self.stride is not None and self.stride > self.context:
            raise ConfigError(f"perplexity.stride ({self.stride}) must be <= perplexity.context ({self.context})")


@dataclass
class CalibrationSection:
    """Calibration input ids for conversions that need them (strategy=fit): the TRAIN split, never the evaluation
    split."""

    corpus: str | None = opt(None, help="calibration corpus (null = the perplexity corpus)")
    split: str = opt("train", choices=("train", "validation", "all"), help="corpus split")
    tokens: int = opt(2048, min=1, help="calibration tokens (cut into rows of `block` tokens)")
    block: int = opt(512, min=1, help="row length in tokens")

    def __post_init__(self) -> None:
        check_fields(self, "calibration")
        if self.tokens < self.block:
            raise ConfigError(f"calibration.tokens ({self.tokens}) must be at least one block ({self.block})")


@dataclass
class SpeedSection:
    """Speed and memory (hf_attn_swap.eval.speed)."""

    threads: int | None = opt(1, min=1, help=(
        "torch threads while timing (1: stable ratios on a small shared CPU; null = leave torch's setting)"))
    prefill_lengths: list[int] = opt(default_factory=lambda: [128, 512], min=1, help="prompt lengths timed for prefill")
    prefill_batch: int = opt(1, min=1, help="prompts per prefill")
    decode_contexts: list[int] = opt(default_factory=lambda: [128, 1024], min=1,
                                     help="cache lengths when decode timing starts")
    decode_batch_sizes: list[int] = opt(default_factory=lambda: [1, 4], min=1, help="sequences decoded together")
    decode_steps: int = opt(12, min=1, help="timed single-token steps per cell")
    warmup: int = opt(1, min=0, help="untimed prefill calls per length; decode uses max(2, warmup) untimed steps")
    repeats: int = opt(3, min=1, help="timed prefill calls per length")
    kv_tokens: int | None = opt(None, min=1, help="tokens in the cache when KV bytes are measured "
                                                  "(null = the longest decode context)")
    interleave: bool = opt(True, help=(
        "time all variants round-robin after the quality phase (robust to load changes; keeps every converted model "
        "in memory); false: time each right after its quality phase and free it"))

    def __post_init__(self) -> None:
        check_fields(self, "speed")


@dataclass
class PasskeySection:
    """Passkey retrieval (hf_attn_swap.eval.passkey)."""

    enabled: bool = opt(True, help="run the probe")
    lengths: list[int] = opt(default_factory=lambda: [256, 1024], min=16, help="prompt lengths in tokens")
    depths: list[float] = opt(default_factory=lambda: [0.0, 0.5, 1.0], min=0, max=1, help="needle depths in [0, 1]")
    trials: int = opt(1, min=1, help="pass keys per cell")
    format: str = opt("plain", choices=PASSKEY_FORMATS, help="prompt format")
    max_new_tokens: int = opt(7, min=1, help="tokens decoded per answer")
    batch_size: int = opt(3, min=1, help="prompts per forward")

    def __post_init__(self) -> None:
        check_fields(self, "passkey")


@dataclass
class EvalConfig:
    """Everything one comparison run needs; built from YAML (:func:`load_config`) or directly.

    ``variants`` are specs ``"name:key=value,..."`` (one comma-separated string is split with
    :func:`hf_attn_swap.specs.parse_variant_list`); ``baseline`` (the unconverted model) is added first if missing:
    every ratio is against it.
    """

    model: str = opt("smollm2-135m", help="short name of hf_attn_swap.zoo (smollm2-135m) or a local model directory")
    variants: list[str] = opt(default_factory=lambda: list(DEFAULT_VARIANTS), parse=parse_variants, help=(
        "variant specs, e.g. 'baseline,gqa:groups=1,strategy=fit,sliding_window:window=256' (see hf-attn-swap "
        "variants); baseline is always added first"))
    out: str = opt("results/eval_default", help="output directory")
    overwrite: bool = opt(False, help="allow writing into an output directory that already holds results")
    dtype: str = opt("float32", choices=DTYPES, help="model dtype")
    device: str = opt("auto", help="auto (the GPU when there is one, else cpu), cpu, cuda, cuda:0, ...")
    eval_threads: int | None = opt(1, min=1, help=(
        "torch threads for perplexity, passkey and calibration (1: on a small shared CPU one thread contends "
        "least; null = torch's default)"))
    missing: str = opt("error", choices=("error", "skip"), help=(
        "a variant that is not registered: error (stop before loading anything) or skip (record the reason, go on)"))
    progress: bool = opt(False, help="progress bars")
    plot: bool = opt(True, help="write pareto.png (needs matplotlib)")
    seed: int = opt(0, help="global torch seed (conversions with randomness have their own seed option)")
    perplexity: PerplexitySection = opt(default_factory=PerplexitySection, help="perplexity options")
    calibration: CalibrationSection = opt(default_factory=CalibrationSection, help="calibration options")
    speed: SpeedSection = opt(default_factory=SpeedSection, help="speed and KV-memory options")
    passkey: PasskeySection = opt(default_factory=PasskeySection, help="passkey-retrieval options")
    uptrained: dict[str, str] = opt(default_factory=dict, help=(
        "uptrained checkpoints evaluated as extra rows, {folder: the variant spec its training started from}, e.g. "
        "{out/uptrain/final: 'mqa:strategy=fit'}; that spec must be in variants (its untrained row): each gets "
        "recovery (and domain_recovery), the share of the log-perplexity gap it won back"))

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model:
            raise ConfigError("model must be a short name or a path, got ''")
        self.variants = [parse_variants(v) for v in self.variants]  # one item may hold several specs
        self.variants = [v for group in self.variants for v in group]
        self.uptrained = {str(k): format_spec(v) for k, v in self.uptrained.items()}
        self._check_uptrained()

    def _check_uptrained(self) -> None:
        """Each uptrained checkpoint's starting conversion must be a row too: recovery is measured against it."""
        from ..specs import format_variant

        known = [format_variant(n, o) for n, o in self.variant_specs()]
        for folder, spec in self.uptrained.items():
            if spec not in known[1:]:
                raise ConfigError(
                    f"uptrained: {folder!r} names {spec!r} as its untrained conversion, which is not one of the "
                    f"variants ({', '.join(known[1:]) or 'none'}); add it to variants so that recovery can be measured"
                )

    def variant_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(name, options), ...]`` with ``baseline`` first."""
        from ..specs import parse_variant_list

        specs = [s for v in self.variants for s in parse_variant_list(v)]
        return [(BASELINE, {})] + [(n, o) for n, o in specs if n != BASELINE]

    def to_dict(self) -> dict[str, Any]:
        return cliconfig.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """Build and validate; unknown keys raise :class:`ConfigError` with the closest valid name."""
        return cliconfig.from_dict(cls, data)


def format_spec(text: str) -> str:
    """One variant spec in the canonical form :meth:`EvalConfig.variant_specs` uses (``"mqa:strategy=fit"``)."""
    specs = parse_variants(str(text))
    if len(specs) != 1:
        raise ConfigError(f"expected one variant spec, got {text!r}")
    return specs[0]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (``speed.threads=2``, ``passkey.lengths=[256,512]``) to config data;
    values are parsed by the field's type (:func:`hf_attn_swap.cliconfig.parse_text`)."""
    return cliconfig.apply_overrides(EvalConfig, data, overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """Read a YAML/JSON config (None = all defaults), apply dotted overrides, validate.

    Raises:
        ConfigError: missing or unreadable file, unknown keys, invalid values.
    """
    return cliconfig.load(EvalConfig, path, overrides or [])


__all__ = [
    "BASELINE",
    "CalibrationSection",
    "ConfigError",
    "DEFAULT_VARIANTS",
    "DTYPES",
    "EvalConfig",
    "PASSKEY_FORMATS",
    "PasskeySection",
    "PerplexitySection",
    "SpeedSection",
    "apply_overrides",
    "load_config",
    "parse_variants",
]
