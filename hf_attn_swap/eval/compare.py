"""The comparison recipe: one model, a list of attention variants, every number that answers "what do I lose and
what do I gain?": perplexity, prefill and decode speed, KV-cache bytes, peak memory and passkey retrieval, each
against the unconverted baseline, with notes wherever a ratio cannot mean a speed-up.

Used by ``hf-attn-swap eval`` and ``recipes/eval_ppl_speed.py``::

    cfg = load_config("recipes/configs/eval_default.yaml", ["perplexity.max_tokens=2048"])
    records = run_comparison(cfg)          # also writes results.json/.csv/.md and pareto.png into cfg.out

Every variant is applied to a fresh deep copy of the baseline, so variants never stack. A variant that is not
registered, or that fails to apply or to run, becomes a record with ``status`` ``"skipped"`` or ``"error"`` and the
reason (or, with ``missing="error"``, an unregistered name stops the run before anything is loaded).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

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


class ConfigError(ValueError):
    """A recipe config is invalid (unknown key, wrong type, impossible value)."""


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr((where + '.' if where else '') + k) for k in unknown)}; "
            f"allowed in {where or 'the top level'}: {', '.join(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = _SECTIONS.get(name) if not where else None
        kwargs[name] = _from_dict(sub, value or {}, name) if sub is not None else value
    return cls(**kwargs)


def _check_int_list(name: str, value: Any, lo: int = 1) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in value):
        raise ConfigError(f"{name} must be a non-empty list of integers >= {lo}, got {value!r}")
    return [int(v) for v in value]


def _check_int(name: str, value: Any, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}{' or null' if allow_none else ''}, got {value!r}")


@dataclass
class PerplexitySection:
    """Perplexity: strided windows over the first ``max_tokens`` tokens of ``corpus``'s ``split``.

    Attributes:
        corpus: a corpus name of :mod:`hf_attn_swap.data` (``shakespeare``, ``kjv``, ``sotu``, ``wikitext-2`` where
            the Hub is reachable) or a local ``.txt`` file / directory.
        split: ``validation`` (default), ``train`` or ``all``.
        max_tokens: tokens evaluated (null = the whole split).
        context: window length.
        stride: new tokens scored per window (null = context: consecutive windows share one token).
        batch_size: windows per forward.
    """

    corpus: str = "shakespeare"
    split: str = "validation"
    max_tokens: int | None = 4096
    context: int = 512
    stride: int | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "all"):
            raise ConfigError(f"perplexity.split must be train, validation or all, got {self.split!r}")
        _check_int("perplexity.max_tokens", self.max_tokens, 2, allow_none=True)
        _check_int("perplexity.context", self.context, 2)
        _check_int("perplexity.stride", self.stride, 1, allow_none=True)
        _check_int("perplexity.batch_size", self.batch_size, 1)
        if self.stride is not None and self.stride > self.context:
            raise ConfigError(f"perplexity.stride ({self.stride}) must be <= perplexity.context ({self.context})")


@dataclass
class CalibrationSection:
    """Calibration input ids for conversions that need them (``strategy=fit``): the TRAIN split, never the
    evaluation split.

    Attributes:
        corpus: null = the perplexity corpus.
        split: default ``train``.
        tokens: calibration tokens (cut into rows of ``block`` tokens).
        block: row length.
    """

    corpus: str | None = None
    split: str = "train"
    tokens: int = 2048
    block: int = 512

    def __post_init__(self) -> None:
        _check_int("calibration.tokens", self.tokens, 1)
        _check_int("calibration.block", self.block, 1)
        if self.tokens < self.block:
            raise ConfigError(f"calibration.tokens ({self.tokens}) must be at least one block ({self.block})")


@dataclass
class SpeedSection:
    """Speed and memory (see :mod:`hf_attn_swap.eval.speed`).

    Attributes:
        threads: torch threads while timing (1 = stable ratios on a small shared CPU; null = leave as is).
        prefill_lengths: prompt lengths timed for prefill.
        prefill_batch: prompts per prefill.
        decode_contexts: cache lengths when decode timing starts.
        decode_batch_sizes: sequences decoded together.
        decode_steps: timed single-token steps per cell.
        warmup: untimed prefill calls per length; decode uses ``max(2, warmup)`` untimed steps.
        repeats: timed prefill calls per length.
        kv_tokens: tokens in the cache when KV bytes are measured (null = the longest decode context).
        interleave: time all variants round-robin after the quality phase (robust to load changes on a shared
            machine; keeps every converted model in memory). False: time each variant right after its quality phase
            and free it (less memory, ratios exposed to load drift).
    """

    threads: int | None = 1
    prefill_lengths: list[int] = field(default_factory=lambda: [128, 512])
    prefill_batch: int = 1
    decode_contexts: list[int] = field(default_factory=lambda: [128, 1024])
    decode_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    decode_steps: int = 12
    warmup: int = 1
    repeats: int = 3
    kv_tokens: int | None = None
    interleave: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.interleave, bool):
            raise ConfigError(f"speed.interleave must be true or false, got {self.interleave!r}")
        _check_int("speed.threads", self.threads, 1, allow_none=True)
        self.prefill_lengths = _check_int_list("speed.prefill_lengths", self.prefill_lengths)
        self.decode_contexts = _check_int_list("speed.decode_contexts", self.decode_contexts)
        self.decode_batch_sizes = _check_int_list("speed.decode_batch_sizes", self.decode_batch_sizes)
        _check_int("speed.prefill_batch", self.prefill_batch, 1)
        _check_int("speed.decode_steps", self.decode_steps, 1)
        _check_int("speed.warmup", self.warmup, 0)
        _check_int("speed.repeats", self.repeats, 1)
        _check_int("speed.kv_tokens", self.kv_tokens, 1, allow_none=True)


@dataclass
class PasskeySection:
    """Passkey retrieval (see :mod:`hf_attn_swap.eval.passkey`).

    Attributes:
        enabled: run the probe.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        trials: pass keys per cell.
        format: ``plain`` or ``chat``.
        max_new_tokens: tokens decoded per answer.
        batch_size: prompts per forward.
    """

    enabled: bool = True
    lengths: list[int] = field(default_factory=lambda: [256, 1024])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    trials: int = 1
    format: str = "plain"
    max_new_tokens: int = 7
    batch_size: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"passkey.enabled must be true or false, got {self.enabled!r}")
        self.lengths = _check_int_list("passkey.lengths", self.lengths, lo=16)
        depths = self.depths if isinstance(self.depths, (list, tuple)) else [self.depths]
        if not depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
            raise ConfigError(f"passkey.depths must be a non-empty list of numbers in [0, 1], got {self.depths!r}")
        self.depths = [float(d) for d in depths]
        _check_int("passkey.trials", self.trials, 1)
        _check_int("passkey.max_new_tokens", self.max_new_tokens, 1)
        _check_int("passkey.batch_size", self.batch_size, 1)
        from .passkey import FORMATS

        if self.format not in FORMATS:
            raise ConfigError(f"passkey.format must be one of {', '.join(FORMATS)}, got {self.format!r}")


_SECTIONS: dict[str, type] = {
    "perplexity": PerplexitySection,
    "calibration": CalibrationSection,
    "speed": SpeedSection,
    "passkey": PasskeySection,
}


@dataclass
class EvalConfig:
    """Everything one comparison run needs; built from YAML (:func:`load_config`) or directly.

    Attributes:
        model: a short name of :mod:`hf_attn_swap.zoo` (``smollm2-135m``) or a local model directory.
        variants: variant specs, ``"name:key=value,..."`` each (a single comma-separated string is parsed with
            :func:`hf_attn_swap.specs.parse_variant_list`). ``baseline`` (the unconverted model) is added first if
            missing: every ratio is against it.
        out: output directory.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:0``...
        eval_threads: torch threads for perplexity, passkey and calibration (default 1: on a small shared CPU one
            thread contends least; null = torch's default).
        missing: what to do with a variant that is not registered: ``skip`` (record the reason) or ``error``.
        progress: progress bars.
        plot: write ``pareto.png`` (needs matplotlib).
        seed: global torch seed (conversions with randomness have their own ``seed`` option).
    """

    model: str = "smollm2-135m"
    variants: Any = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    out: str = "results/eval_default"
    dtype: str = "float32"
    device: str = "cpu"
    eval_threads: int | None = 1
    missing: str = "skip"
    progress: bool = False
    plot: bool = True
    seed: int = 0
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    passkey: PasskeySection = field(default_factory=PasskeySection)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, name))
            elif not isinstance(value, cls):
                raise ConfigError(f"{name} must be a mapping, got {type(value).__name__}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a short name or a path, got {self.model!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.missing not in ("skip", "error"):
            raise ConfigError(f"missing must be 'skip' or 'error', got {self.missing!r}")
        _check_int("eval_threads", self.eval_threads, 1, allow_none=True)
        self.variants = [f"{n}:{','.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o in self.variant_specs()]

    def variant_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(name, options), ...]`` with ``baseline`` first."""
        from ..specs import parse_variant_list

        items = self.variants
        if isinstance(items, str):
            specs = parse_variant_list(items)
        elif isinstance(items, (list, tuple)) and items and all(isinstance(v, str) for v in items):
            specs = [s for v in items for s in parse_variant_list(v)]
        else:
            raise ConfigError(f"variants must be a non-empty list of strings like 'gqa:groups=1', got {items!r}")
        specs = [(n, o) for n, o in specs if n != BASELINE] if any(n == BASELINE for n, _ in specs) else specs
        return [(BASELINE, {})] + specs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """Build and validate; unknown keys raise :class:`ConfigError` naming the allowed ones."""
        return _from_dict(cls, dict(data), "")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (``speed.threads=2``, ``passkey.lengths=[256,512]``) to a config dict.

    Values are parsed as YAML (``[1, 2]`` is a list, ``null`` is None, ``2`` an int); ``variants`` also accepts the
    command-line list syntax ``baseline,gqa:groups=1,sliding_window:window=256``.
    """
    import yaml

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. speed.threads=2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = raw if key == "variants" else yaml.safe_load(raw)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in _SECTIONS:
                raise ConfigError(f"override {key!r}: {p!r} is not a section; sections: {', '.join(_SECTIONS)}")
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a mapping in the config")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """Read a YAML config (None = all defaults), apply dotted overrides, validate.

    Raises:
        ConfigError: unknown keys, invalid values, unreadable YAML.
        FileNotFoundError: ``path`` does not exist.
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return EvalConfig.from_dict(apply_overrides(data, overrides or []))


# --------------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------------


def check_variants(cfg: EvalConfig) -> dict[str, str]:
    """Validate every variant spec before anything is loaded.

    Returns:
        ``{spec: reason}`` for variants to skip (not registered, with ``missing="skip"``).

    Raises:
        ValueError: a variant is not registered (with ``missing="error"``), or its options are invalid.
    """
    from ..registry import get_variant, list_variants
    from ..specs import format_variant

    known = list_variants()
    skip: dict[str, str] = {}
    for name, opts in cfg.variant_specs():
        spec = format_variant(name, opts)
        if name == BASELINE:
            if opts:
                raise ValueError(f"'baseline' takes no options, got {opts}")
            continue
        if name not in known:
            reason = f"variant {name!r} is not registered (registered: {', '.join(known)})"
            if cfg.missing == "error":
                raise ValueError(reason + "; use missing=skip to record it and go on")
            logger.warning("%s: skipping it", reason)
            skip[spec] = reason
            continue
        get_variant(name).config_cls.from_dict(opts)  # unknown / invalid options fail here, before the long run
    return skip


def _check_lengths(cfg: EvalConfig, model: torch.nn.Module) -> None:
    from .perplexity import max_context

    limit = max_context(model)
    if limit is None:
        return
    checks = [("perplexity.context", cfg.perplexity.context)]
    checks += [("speed.prefill_lengths", max(cfg.speed.prefill_lengths))]
    checks += [("speed.decode_contexts", max(cfg.speed.decode_contexts) + max(2, cfg.speed.warmup) + cfg.speed.decode_steps)]
    if cfg.passkey.enabled:
        checks.append(("passkey.lengths", max(cfg.passkey.lengths) + cfg.passkey.max_new_tokens))
    for name, n in checks:
        if n > limit:
            raise ValueError(
                f"{name} needs {n} tokens, longer than the model allows (max_position_embeddings={limit})"
            )


def _load(cfg: EvalConfig):
    from ..devices import resolve
    from ..zoo import load_model

    device, dtype = resolve(cfg.device, cfg.dtype)
    model, tok = load_model(cfg.model, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), tok


def _check_placement(cfg: EvalConfig, model: torch.nn.Module) -> None:
    """A model passed in must already be where ``cfg`` says: the comparison never moves (modifies) it."""
    from ..devices import dtype_name, resolve

    device, dtype = resolve(cfg.device, cfg.dtype)
    p = next(model.parameters())
    same_device = p.device.type == device.type and (device.index is None or p.device.index == device.index)
    if not same_device or p.dtype != dtype:
        raise ValueError(
            f"the model passed is on {p.device} in {dtype_name(p.dtype)}, the config asks for {device} in "
            f"{dtype_name(dtype)}; move it (model.to(device, dtype)) or set device/dtype in the config to match"
        )


def run_comparison(
    cfg: EvalConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    write: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate the baseline and every variant of ``cfg``; write the reports into ``cfg.out``.

    Args:
        cfg: the run's config.
        model: an already loaded baseline (else ``cfg.model`` is loaded); it is never modified.
        tokenizer: its tokenizer (needed with ``model``).
        write: write ``results.json``, ``results.csv``, ``results.md``, ``pareto.png`` and ``run.json``.
        overwrite: write them into a non-empty ``cfg.out`` that holds no previous comparison (its files are left
            alone); checked before anything is loaded.

    Returns:
        One record per variant (baseline first); see :mod:`hf_attn_swap.eval.report` for the fields.

    Raises:
        ValueError: invalid variants/options or an ``cfg.out`` it may not write (both before loading), an empty
            corpus, lengths beyond the model's context.
    """
    from ..data import load_text, tokenize
    from ..devices import resolve
    from .speed import environment, num_threads

    t_start = time.perf_counter()
    resolve(cfg.device, cfg.dtype)  # CUDA that is not here, a dtype the device cannot run: one line, nothing loaded
    if model is not None:
        _check_placement(cfg, model)
    if write:
        from ..outputs import EVAL_KIND, check_output_dir

        check_output_dir(cfg.out, overwrite=overwrite, kind=EVAL_KIND)
    skip = check_variants(cfg)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = _load(cfg)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    model.eval()
    _check_lengths(cfg, model)

    p = cfg.perplexity
    text = load_text(p.corpus, split=p.split)
    ids = tokenize(tokenizer, text, p.max_tokens)
    if ids.numel() < 2:
        raise ValueError(f"empty corpus: {p.corpus!r} ({p.split}) gives {ids.numel()} token(s); need at least 2")
    span = text if p.max_tokens is None else tokenizer.decode(ids.tolist())
    calibration = _Lazy(lambda: _calibration(cfg, tokenizer))

    records: list[dict[str, Any]] = []
    kept: dict[str, torch.nn.Module] = {}  # spec -> model awaiting the (interleaved) speed phase
    from ..specs import format_variant

    for name, opts in cfg.variant_specs():
        spec = format_variant(name, opts)
        if spec in skip:
            records.append(_skipped(spec, name, opts, "skipped", skip[spec]))
            continue
        logger.info("evaluating %s", spec)
        t0 = time.perf_counter()
        work = model
        try:
            if name != BASELINE:
                from ..api import swap_attention

                work = copy.deepcopy(model)
                kw = {"calibration": calibration.get()} if opts.get("strategy") == "fit" else {}
                with num_threads(cfg.eval_threads):
                    swap_attention(work, name, **kw, **opts)
            convert_s = time.perf_counter() - t0
            rec = _quality(cfg, work, tokenizer, ids, span)
            rec.update(variant=spec, name=name, options=opts, status="ok", reason="", convert_s=round(convert_s, 2))
            if cfg.speed.interleave:
                kept[spec] = work
            else:
                _speed_phase(cfg, {spec: work}, {spec: rec}, ids)
        except Exception as err:  # noqa: BLE001 - one broken variant must not sink the whole comparison
            if name == BASELINE:
                raise
            logger.error("variant %s failed: %s: %s", spec, type(err).__name__, err)
            rec = _skipped(spec, name, opts, "error", f"{type(err).__name__}: {err}")
        rec["runtime_s"] = round(time.perf_counter() - t0, 1)
        if work is not model and spec not in kept:
            del work
        gc.collect()
        records.append(rec)

    if kept:
        t0 = time.perf_counter()
        by_spec = {r["variant"]: r for r in records}
        _speed_phase(cfg, kept, by_spec, ids)
        share = (time.perf_counter() - t0) / len(kept)
        for spec in kept:
            by_spec[spec]["runtime_s"] = round(by_spec[spec]["runtime_s"] + share, 1)
        kept.clear()
        gc.collect()
    if records[0].get("status") != "ok":
        raise RuntimeError(f"the baseline could not be measured: {records[0].get('reason')}")

    from .notes import annotate

    annotate(records, cfg, model)
    runtime = time.perf_counter() - t_start
    with num_threads(cfg.speed.threads):
        env = environment(model)
    meta = {
        # the command line that produced these figures (shown at the top of results.md)
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": cfg.to_dict(),
        "runtime_s": round(runtime, 1),
        "environment": env,
        "eval_tokens": int(ids.numel()),
        "eval_tokens_total": int(ids.numel()) * sum(r["status"] == "ok" for r in records),
        "registered_variants": _registered(),
    }
    from .perplexity import NORMALISATION

    meta["normalisation"] = NORMALISATION
    # What every phase actually ran in, read off the model (not the config): results.md states it in its header.
    meta["run_on"] = {"device": env["device"], "dtype": env["dtype"], "eval_threads": _threads(cfg.eval_threads),
                      "speed_threads": _threads(cfg.speed.threads)}
    for r in records:
        r["run_runtime_s"] = meta["runtime_s"]
    if write:
        from .report import write_reports

        write_reports(records, meta, cfg.out, plot=cfg.plot)
    logger.info("comparison of %d variant(s) done in %.0f s", len(records), runtime)
    return records


def _threads(n: int | None) -> int:
    """Torch threads a phase configured with ``n`` runs on (None: torch's current count)."""
    return int(n) if n is not None else torch.get_num_threads()


def _registered() -> list[str]:
    from ..registry import list_variants

    return list_variants()


class _Lazy:
    def __init__(self, fn):
        self.fn, self.value, self.done = fn, None, False

    def get(self):
        if not self.done:
            self.value, self.done = self.fn(), True
        return self.value


def _calibration(cfg: EvalConfig, tokenizer: Any) -> torch.Tensor:
    from ..data import load_text, tokenize

    c = cfg.calibration
    corpus = c.corpus or cfg.perplexity.corpus
    ids = tokenize(tokenizer, load_text(corpus, split=c.split), c.tokens)
    rows = ids.numel() // c.block
    if rows < 1:
        raise ValueError(f"calibration corpus {corpus!r} ({c.split}) has {ids.numel()} tokens, fewer than one block of {c.block}")
    logger.info("calibration: %d x %d tokens of %s (%s split)", rows, c.block, corpus, c.split)
    return ids[: rows * c.block].view(rows, c.block)


def _skipped(spec: str, name: str, opts: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    return {"variant": spec, "name": name, "options": opts, "status": status, "reason": reason, "notes": [reason]}


def _quality(cfg: EvalConfig, model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor, span: str) -> dict[str, Any]:
    """Perplexity and passkey of one model (peak memory measured around the passkey probe: prefill + cached decode
    of ``passkey.batch_size`` prompts of the longest length; around perplexity if the probe is off)."""
    from .memory import PeakMemory
    from .passkey import passkey_accuracy
    from .perplexity import perplexity
    from .speed import num_threads

    rec: dict[str, Any] = {}
    p, k = cfg.perplexity, cfg.passkey
    device = torch.device(cfg.device)
    t0 = time.perf_counter()
    with num_threads(cfg.eval_threads), PeakMemory(device) as mem:
        ppl = perplexity(model, ids, context=p.context, stride=p.stride, batch_size=p.batch_size, text=span, progress=cfg.progress)
    rec["perplexity"] = ppl.token_ppl
    rec["bits_per_byte"] = ppl.bits_per_byte
    rec["word_perplexity"] = ppl.word_ppl
    rec["ppl_detail"] = ppl.to_dict()
    rec["ppl_s"] = round(time.perf_counter() - t0, 1)
    logger.info("  perplexity %.3f (%d tokens) in %.1f s", ppl.token_ppl, ppl.n_tokens, rec["ppl_s"])
    phase = "perplexity"
    if k.enabled:
        t0 = time.perf_counter()
        with num_threads(cfg.eval_threads), PeakMemory(device) as mem:
            pk = passkey_accuracy(model, tokenizer, lengths=k.lengths, depths=k.depths, trials=k.trials, format=k.format,
                                  max_new_tokens=k.max_new_tokens, batch_size=k.batch_size, progress=cfg.progress)
        phase = f"passkey (prefill + decode of {k.batch_size} x {max(k.lengths)} tokens)"
        rec["passkey_accuracy"] = pk.accuracy
        rec["passkey"] = pk.grid()
        rec["passkey_answers"] = {f"{c['length']}@{c['depth']:g}": c["answers"] for c in pk.cells}
        rec["passkey_s"] = round(time.perf_counter() - t0, 1)
        logger.info("  passkey %.2f in %.1f s", pk.accuracy, rec["passkey_s"])
    else:
        rec["passkey_accuracy"] = None
    rec["peak_mem_bytes"], rec["peak_mem_delta_bytes"] = mem.peak, mem.delta
    rec["peak_mem_kind"], rec["peak_mem_phase"] = mem.kind, phase
    rec["kv_heads"] = _kv_heads(model)
    return rec


def _speed_phase(cfg: EvalConfig, models: dict[str, torch.nn.Module], records: dict[str, dict[str, Any]], ids: torch.Tensor) -> None:
    """Time ``models`` round-robin and fill the speed and KV fields of their records (errors mark the record)."""
    from .memory import analytic_kv_bytes, full_kv_bytes, measure_kv_bytes
    from .speed import _ids, _prefilled, compare_speed, environment, num_threads

    s = cfg.speed
    t0 = time.perf_counter()
    logger.info("timing %d model(s) round-robin: prefill %s, decode contexts %s x batches %s",
                len(models), s.prefill_lengths, s.decode_contexts, s.decode_batch_sizes)
    with num_threads(s.threads):
        results, errors = compare_speed(
            models, prefill_lengths=s.prefill_lengths, prefill_batch=s.prefill_batch, decode_contexts=s.decode_contexts,
            decode_batch_sizes=s.decode_batch_sizes, steps=s.decode_steps, warmup=s.warmup,
            decode_warmup=max(2, s.warmup), repeats=s.repeats, input_ids=ids,
        )
        envs = {spec: environment(m) for spec, m in models.items()}
    speed_s = round(time.perf_counter() - t0, 1)
    n_kv = s.kv_tokens or max(s.decode_contexts)
    kv_batch = min(s.decode_batch_sizes)
    for spec, model in models.items():
        rec = records[spec]
        if spec in errors:
            rec.update(status="error", reason=f"speed measurement failed: {errors[spec]}")
            rec["notes"] = [rec["reason"]]
            continue
        prefill, decode = results[spec]["prefill"], results[spec]["decode"]
        rec["env"], rec["prefill"], rec["decode"] = envs[spec], prefill, decode
        rec["speed_interleaved"] = len(models) > 1
        rec["speed_s"] = speed_s
        head_p = max(prefill, key=lambda r: r["length"])
        head_d = max(decode, key=lambda r: (r["context"], r["batch"]))
        rec["prefill_ms"], rec["prefill_length"] = head_p["median_ms"], head_p["length"]
        rec["decode_tokens_per_s"] = head_d["tokens_per_s"]
        rec["decode_context"], rec["decode_batch"] = head_d["context"], head_d["batch"]
        cell = next((c for c in decode if c["context"] == n_kv and c["batch"] == kv_batch), None)
        if cell is not None:  # the decode harness measured the cache it started from
            kv = {k: cell[k] for k in ("kv_bytes", "kv_bytes_kv_only", "kv_storage_bytes", "kv_layer_types")}
        else:
            with num_threads(cfg.eval_threads), torch.no_grad():
                cache, _ = _prefilled(model, _ids(model, kv_batch, n_kv, ids))
                m = measure_kv_bytes(cache)
                del cache
            kv = {"kv_bytes": m.total, "kv_bytes_kv_only": m.kv_only, "kv_storage_bytes": m.storage,
                  "kv_layer_types": sorted(set(m.layer_types))}
        rec.update(kv)
        rec["kv_bytes_analytic"] = analytic_kv_bytes(model, n_kv, batch=kv_batch)[0]
        rec["kv_bytes_full"] = full_kv_bytes(model, n_kv, batch=kv_batch)
        rec["kv_tokens"], rec["kv_batch"] = n_kv, kv_batch
        logger.info("  %s: prefill %.0f ms @%d, decode %.1f tok/s @%dx%d", spec, rec["prefill_ms"], rec["prefill_length"],
                    rec["decode_tokens_per_s"], rec["decode_context"], rec["decode_batch"])


def _kv_heads(model: torch.nn.Module) -> list[int] | None:
    try:
        from ..api import kv_heads_per_layer

        heads = kv_heads_per_layer(model)
        return sorted(set(heads))
    except Exception:  # noqa: BLE001 - informative only
        return None


__all__ = [
    "BASELINE",
    "CalibrationSection",
    "ConfigError",
    "DEFAULT_VARIANTS",
    "EvalConfig",
    "PasskeySection",
    "PerplexitySection",
    "SpeedSection",
    "apply_overrides",
    "check_variants",
    "load_config",
    "run_comparison",
]
