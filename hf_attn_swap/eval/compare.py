"""The comparison recipe: one model, a list of attention variants, every number that answers "what do I lose and
what do I gain?": perplexity, prefill and decode speed, KV-cache bytes, peak memory and passkey retrieval, each
against the unconverted baseline, with notes wherever a ratio cannot mean a speed-up.

Used by ``hf-attn-swap eval`` and ``recipes/eval_ppl_speed.py``; the config (:class:`EvalConfig`) lives in the
torch-free :mod:`hf_attn_swap.eval.config` and is re-exported here::

    cfg = load_config("recipes/configs/eval_default.yaml", ["perplexity.max_tokens=2048"])
    records = run_comparison(cfg)          # also writes results.json/.csv/.md and pareto.png into cfg.out

Every variant is applied to a fresh deep copy of the baseline, so variants never stack. A variant that is not
registered stops the run before anything is loaded (``missing="skip"`` records it and goes on instead); one that
fails to apply or to run becomes a record with ``status`` ``"error"`` and the reason.

``perplexity.domains`` adds every variant's perplexity on the validation split of more corpora (``domain_perplexity``,
``domain_ppl_ratio``); ``uptrained`` adds checkpoints trained after a conversion as rows of their own, with the share
of the log-perplexity gap they won back over that conversion's untrained row (``recovery``, ``domain_recovery``).
Both are checked (names, lengths, folders, tokenizers) before any model is loaded.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from .config import (  # noqa: F401 - re-exported: the config used to live here
    BASELINE,
    DEFAULT_VARIANTS,
    CalibrationSection,
    ConfigError,
    EvalConfig,
    PasskeySection,
    PerplexitySection,
    SpeedSection,
    apply_overrides,
    load_config,
)

logger = logging.getLogger(__name__)

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
            skip[spec] = reason
            continue
        get_variant(name).config_cls.from_dict(opts)  # unknown / invalid options fail here, before the long run
    return skip


def check_domains(cfg: EvalConfig, tokenizer: Any) -> dict[str, tuple[torch.Tensor, str]]:
    """Validate ``perplexity.domains`` and tokenize each one's validation split, before any model is loaded.

    Every domain is scored like the main corpus (``perplexity.context``, ``stride``, ``max_tokens``) and must be long
    enough for ``max_tokens``: a shorter one would be a different measurement than the others.

    Returns:
        ``{domain: (ids, evaluated text)}`` in the config's order.

    Raises:
        ValueError: a name that is neither a corpus of :func:`hf_attn_swap.data.list_corpora` nor an existing path
            (the message lists the allowed names), a domain listed twice, a validation split shorter than
            ``perplexity.max_tokens`` (the message says how long it is), or a corpus that cannot be loaded.
    """
    from ..data import list_corpora, load_text, tokenize

    p = cfg.perplexity
    known = list_corpora()
    seen: dict[str, str] = {}
    for name in p.domains:
        path = Path(name).expanduser()
        if not path.exists() and name not in known:
            raise ValueError(f"perplexity.domains: unknown domain {name!r}; allowed: {', '.join(known)}, or a .txt "
                             "file or a folder of .txt files")
        key = str(path.resolve()) if path.exists() else name
        if key in seen:
            same = "" if seen[key] == name else f" (as {seen[key]!r} and {name!r})"
            raise ValueError(f"perplexity.domains lists {seen[key]!r} twice{same}; list each domain once")
        seen[key] = name
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for name in p.domains:
        text = load_text(name, split="validation")
        ids = tokenize(tokenizer, text, p.max_tokens)
        need = p.max_tokens or 2
        if ids.numel() < need:
            raise ValueError(
                f"perplexity.domains: the validation split of {name!r} is {ids.numel()} tokens long, shorter than "
                f"perplexity.max_tokens={need}; lower max_tokens or drop {name!r}"
            )
        out[name] = (ids, text if p.max_tokens is None else tokenizer.decode(ids.tolist()))
        logger.info("domain %s: %d tokens of its validation split", name, ids.numel())
    return out


def _check_uptrained(cfg: EvalConfig, tokenizer: Any) -> None:
    """Each ``uptrained`` folder holds a model that fits, with the baseline's tokenizer (checked before loading)."""
    from transformers import AutoTokenizer

    from ..devices import resolve
    from ..preflight import preflight
    from ..zoo import _has_tokenizer

    device, dtype = resolve(cfg.device, cfg.dtype)
    for folder in cfg.uptrained:
        try:
            preflight(folder, dtype, device)
        except ValueError as err:
            raise ValueError(f"uptrained: {err}") from None
        if _has_tokenizer(Path(folder)) and AutoTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"uptrained: {folder!r} has another tokenizer than {cfg.model!r}: its perplexities would "
                             "not be comparable; evaluate a checkpoint trained from this model")


def _load_tokenizer(cfg: EvalConfig) -> Any:
    """The baseline's tokenizer alone, for the checks that must run before any model is loaded."""
    from transformers import AutoTokenizer

    from ..zoo import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(cfg.model))


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
        ValueError: invalid variants/options, domains (:func:`check_domains`), uptrained folders, or an ``cfg.out``
            it may not write (all before loading a model), an empty corpus, lengths beyond the model's context.
    """
    from ..data import load_text, tokenize
    from ..devices import resolve
    from .speed import environment, num_threads

    t_start = time.perf_counter()
    resolve(cfg.device, cfg.dtype)  # CUDA that is not here, a dtype the device cannot run: one line, nothing loaded
    if model is not None:
        _check_placement(cfg, model)
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
    if write:
        from ..outputs import EVAL_KIND, check_output_dir

        check_output_dir(cfg.out, overwrite=overwrite or cfg.overwrite, kind=EVAL_KIND)
    skip = check_variants(cfg)
    for reason in skip.values():
        logger.warning("%s: skipping it (missing=skip)", reason)
    domains: dict[str, tuple[torch.Tensor, str]] = {}
    if cfg.perplexity.domains or cfg.uptrained:
        checking_tok = tokenizer if tokenizer is not None else _load_tokenizer(cfg)
        _check_uptrained(cfg, checking_tok)
        domains = check_domains(cfg, checking_tok)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = _load(cfg)
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

    rows = [(format_variant(n, o), n, o, None) for n, o in cfg.variant_specs()]
    rows += [(_uptrained_label(folder, spec), UPTRAINED, {"checkpoint": folder, "converted": spec}, folder)
             for folder, spec in cfg.uptrained.items()]
    for spec, name, opts, folder in rows:
        if spec in skip:
            records.append(_skipped(spec, name, opts, "skipped", skip[spec]))
            continue
        logger.info("evaluating %s", spec)
        t0 = time.perf_counter()
        work = model
        try:
            if folder is not None:
                work = _load_checkpoint(cfg, folder)
            elif name != BASELINE:
                from ..api import swap_attention
                from ..convert.pooling import CALIBRATED

                work = copy.deepcopy(model)
                kw = {"calibration": calibration.get()} if opts.get("strategy") in CALIBRATED else {}
                with num_threads(cfg.eval_threads):
                    swap_attention(work, name, **kw, **opts)
            convert_s = time.perf_counter() - t0
            rec = _quality(cfg, work, tokenizer, ids, span, domains)
            rec.update(variant=spec, name=name, options=opts, status="ok", reason="", convert_s=round(convert_s, 2))
            if folder is not None:
                rec.update(trained=True, load_s=rec.pop("convert_s"))
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
    _add_recovery(records)
    runtime = time.perf_counter() - t_start
    with num_threads(cfg.speed.threads):
        env = environment(model)
    from ..provenance import command_line, provenance

    meta = {
        # the command line that produced these figures (shown at the top of results.md)
        "command": command_line(),
        "config": cfg.to_dict(),
        "runtime_s": round(runtime, 1),
        "environment": env,
        "eval_tokens": int(ids.numel()),
        "eval_tokens_total": int(ids.numel()) * sum(r["status"] == "ok" for r in records),
        "registered_variants": _registered(),
        # code revision, versions, machine, exact weights and text of this run
        "provenance": provenance(models=[model, *cfg.uptrained],
                                 corpora=[p.corpus, cfg.calibration.corpus or p.corpus, *domains]),
    }
    if domains:
        meta["domain_tokens"] = {name: int(d_ids.numel()) for name, (d_ids, _) in domains.items()}
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


UPTRAINED = "uptrained"


def _uptrained_label(folder: str, spec: str) -> str:
    return f"{spec}, uptrained ({folder})"


def _load_checkpoint(cfg: EvalConfig, folder: str) -> torch.nn.Module:
    """An uptrained checkpoint, loaded like the baseline (a save_swapped folder replays its swap)."""
    from ..devices import resolve
    from ..zoo import load_model

    device, dtype = resolve(cfg.device, cfg.dtype)
    work, _ = load_model(folder, dtype=dtype)
    return work.to(device=device, dtype=dtype).eval()


def _add_recovery(records: list[dict[str, Any]]) -> None:
    """``recovery`` (main corpus) and ``domain_recovery`` of every uptrained row: the share of the log-perplexity gap
    between the baseline and its untrained conversion that the checkpoint won back (1 = all of it, 0 = none, < 0:
    worse than the conversion), per text."""
    base = records[0]
    by_spec = {r["variant"]: r for r in records}
    for rec in records:
        if rec.get("name") != UPTRAINED or rec.get("status") != "ok":
            continue
        spec = rec["options"]["converted"]
        conv = by_spec.get(spec) or {}
        if conv.get("status") != "ok":
            rec["recovery"] = None
            rec["notes"].append(f"no recovery: its untrained conversion {spec} was not measured ({conv.get('status')})")
            continue
        rec["recovery"] = _recovery(base["perplexity"], conv["perplexity"], rec["perplexity"])
        if "domain_perplexity" in rec:
            rec["domain_recovery"] = {
                d: _recovery(base["domain_perplexity"][d], conv["domain_perplexity"][d], ppl)
                for d, ppl in rec["domain_perplexity"].items()
            }
        share = "undefined (no gap)" if rec["recovery"] is None else f"{rec['recovery']:.3f}"
        rec["notes"].append(f"uptrained from {spec} (its untrained row): recovery of the log-perplexity gap {share} "
                            "on the main corpus")


def _recovery(original: float, converted: float, uptrained: float) -> float | None:
    """log_gap_recovery, None where the conversion lost nothing (no gap to win back): JSON has no NaN."""
    from ..train.pipeline import log_gap_recovery

    share = log_gap_recovery(original, converted, uptrained)
    return None if math.isnan(share) else share


def _skipped(spec: str, name: str, opts: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    return {"variant": spec, "name": name, "options": opts, "status": status, "reason": reason, "notes": [reason]}


def _quality(cfg: EvalConfig, model: torch.nn.Module, tokenizer: Any, ids: torch.Tensor, span: str,
             domains: dict[str, tuple[torch.Tensor, str]] | None = None) -> dict[str, Any]:
    """Perplexity (main corpus, then each domain of :func:`check_domains`) and passkey of one model (peak memory
    measured around the passkey probe: prefill + cached decode of ``passkey.batch_size`` prompts of the longest
    length; around the main perplexity if the probe is off)."""
    from .memory import PeakMemory
    from .passkey import passkey_accuracy
    from .perplexity import perplexity
    from .speed import num_threads

    rec: dict[str, Any] = {}
    p, k = cfg.perplexity, cfg.passkey
    from ..devices import resolve_device

    device = resolve_device(cfg.device)  # "auto" is the GPU when there is one
    t0 = time.perf_counter()
    with num_threads(cfg.eval_threads), PeakMemory(device) as mem:
        ppl = perplexity(model, ids, context=p.context, stride=p.stride, batch_size=p.batch_size, text=span, progress=cfg.progress)
    rec["perplexity"] = ppl.token_ppl
    rec["bits_per_byte"] = ppl.bits_per_byte
    rec["word_perplexity"] = ppl.word_ppl
    rec["ppl_detail"] = ppl.to_dict()
    rec["ppl_s"] = round(time.perf_counter() - t0, 1)
    logger.info("  perplexity %.3f (%d tokens) in %.1f s", ppl.token_ppl, ppl.n_tokens, rec["ppl_s"])
    if domains:
        t0 = time.perf_counter()
        per: dict[str, Any] = {}
        with num_threads(cfg.eval_threads):
            for name, (d_ids, d_span) in domains.items():
                if name == p.corpus and p.split == "validation":
                    per[name] = ppl  # the main corpus's validation split: the same ids, measured just above
                else:
                    per[name] = perplexity(model, d_ids, context=p.context, stride=p.stride,
                                           batch_size=p.batch_size, text=d_span, progress=cfg.progress)
        rec["domain_perplexity"] = {n: r.token_ppl for n, r in per.items()}
        rec["domain_bits_per_byte"] = {n: r.bits_per_byte for n, r in per.items()}
        rec["domain_ppl_s"] = round(time.perf_counter() - t0, 1)
        logger.info("  perplexity per domain: %s in %.1f s",
                    ", ".join(f"{n} {r.token_ppl:.3f}" for n, r in per.items()), rec["domain_ppl_s"])
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
    "check_domains",
    "check_variants",
    "load_config",
    "run_comparison",
]
