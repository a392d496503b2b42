"""Ratios against the baseline, and the notes that keep them honest.

A ratio is only printed as a result when the difference is outside the measured spread (the interquartile ranges of
baseline and variant do not overlap); otherwise it is flagged ``n.s.`` and a note says there is no measurable
difference. Notes also say *why* a variant cannot be faster in the measured regime (GQA prefill does the same FLOPs as
MHA, a window at least as long as every context saves nothing, linear attention without a fused kernel, "flash" on a
CPU where SDPA already tiles), so that a 0.97x or 1.02x is not read as a finding.

Per-variant explanations are data: :data:`VARIANT_NOTES` maps a variant name to a function
``(record, baseline, config) -> list[str]``; add an entry when a variant is added.
"""

from __future__ import annotations

from typing import Any, Callable


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _cell(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows or []:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _max_context(cfg: Any) -> int:
    lengths = [cfg.perplexity.context, *cfg.speed.prefill_lengths, *cfg.speed.decode_contexts]
    if cfg.passkey.enabled:
        lengths += cfg.passkey.lengths
    return max(lengths)


def _gqa_notes(rec: dict[str, Any], base: dict[str, Any], cfg: Any) -> list[str]:
    out = []
    if rec.get("kv_heads") == base.get("kv_heads"):
        out.append(
            f"no K/V heads merged (the model already has {base.get('kv_heads')} KV heads per layer): only the attention "
            "kernel differs from the baseline; perplexity, KV bytes and passkey are expected to be identical"
        )
    out.append(
        "prefill: GQA/MQA run the same attention FLOPs as MHA (query heads are not reduced) and the projections "
        "shrink only by the K/V rows: no prefill speed-up is expected; the gain is decode K/V bandwidth and KV memory"
    )
    if rec.get("ppl_ratio") and rec["ppl_ratio"] > 2:
        out.append(
            f"perplexity x{rec['ppl_ratio']:.1f} without uptraining: merged heads need uptraining (GQA paper: ~5% of "
            "pre-training compute) before the quality is usable"
        )
    return out


def _window_notes(rec: dict[str, Any], base: dict[str, Any], cfg: Any) -> list[str]:
    w = (rec.get("options") or {}).get("window")
    out = []
    if w is None:
        return out
    longest = _max_context(cfg)
    if w >= longest:
        out.append(f"window {w} >= every measured context (longest {longest}): no saving possible in this regime")
    else:
        if w >= cfg.perplexity.context:
            out.append(
                f"window {w} >= perplexity context {cfg.perplexity.context}: perplexity cannot change; use a longer "
                "context to see what the window forgets"
            )
        short = [n for n in cfg.speed.decode_contexts if n <= w]
        if short:
            out.append(f"decode contexts {short} fit inside the window: no KV or speed saving there")
        if cfg.passkey.enabled:
            out.append(f"passkey cells longer than the window ({w}) with the needle further back than {w} tokens are "
                       "expected to fail: the window cannot see the key")
    return out


def _on_cpu(cfg: Any) -> bool:
    """Whether the run computed on the CPU (``device: auto`` resolved here, as the run resolved it)."""
    from ..devices import resolve_device

    try:
        return resolve_device(cfg.device).type == "cpu"
    except ValueError:  # a device this machine lacks: the run that wrote these records did not run here
        return str(cfg.device).startswith("cpu")


def _linear_notes(rec: dict[str, Any], base: dict[str, Any], cfg: Any) -> list[str]:
    out = []
    kernel = (rec.get("options") or {}).get("kernel", "auto")
    on_cpu = _on_cpu(cfg)
    if (on_cpu or kernel == "torch") and not (rec.get("prefill_significant") and (rec.get("prefill_speedup") or 0) > 1):
        out.append(
            f"prefill: linear attention without a fused kernel (chunked PyTorch) cannot beat SDPA at "
            f"{rec.get('prefill_length')} tokens; its prefill gain (O(n) instead of O(n^2)) needs long contexts or a "
            "fused kernel"
        )
    window = (rec.get("options") or {}).get("window") or 0
    if window and not (rec.get("decode_significant") and (rec.get("decode_speedup") or 0) > 1):
        out.append(
            f"decode: the hybrid runs, per token and layer, a softmax over its {window}-token window, both feature "
            "maps and a state update: on CPU at these contexts that is no cheaper than SDPA over the full cache (many "
            "small ops per step); its gain here is KV memory, a speed gain needs contexts far beyond the window"
        )
    elif rec.get("decode_significant") and (rec.get("decode_speedup") or 0) > 1:
        out.append("decode: the gain comes from the constant-size recurrent state (no K/V read per step)")
    if rec.get("ppl_ratio") and rec["ppl_ratio"] > 2:
        out.append("no attention transfer / uptraining: a softmax model read through a linear feature map loses most "
                   "of its quality (LoLCATs, Hedgehog need training)")
    return out


def _flash_notes(rec: dict[str, Any], base: dict[str, Any], cfg: Any) -> list[str]:
    if _on_cpu(cfg):
        return ["on CPU the baseline's SDPA already runs an IO-aware tiled (flash) kernel: 'flash' cannot be faster "
                "here; its gain is on GPU over eager attention"]
    return []


def _sparse_notes(rec: dict[str, Any], base: dict[str, Any], cfg: Any) -> list[str]:
    out = ["sparse attention keeps every key in the cache (random blocks can reach anywhere): no KV saving by design"]
    w = (rec.get("options") or {}).get("window")
    if w is not None and w >= _max_context(cfg):
        out.append(f"window {w} >= every measured context: the pattern is dense here, no saving possible")
    return out


#: variant name -> explanations of what it can and cannot gain in the measured regime.
VARIANT_NOTES: dict[str, Callable[[dict[str, Any], dict[str, Any], Any], list[str]]] = {
    "gqa": _gqa_notes,
    "mqa": _gqa_notes,
    "sliding_window": _window_notes,
    "linear": _linear_notes,
    "flash": _flash_notes,
    "sparse": _sparse_notes,
}


def annotate(records: list[dict[str, Any]], cfg: Any, model: Any = None) -> None:
    """Add ratios vs the baseline (first record), significance flags and notes to every ``ok`` record, in place.

    Fields added: ``ppl_delta``, ``ppl_ratio``, ``domain_ppl_ratio`` (with ``domain_perplexity``), ``prefill_speedup`` (baseline ms / variant ms at the headline
    length), ``prefill_significant``, ``decode_speedup`` (variant tokens/s / baseline tokens/s at the headline cell),
    ``decode_significant``, ``kv_ratio``, ``kv_analytic_match``, ``passkey_delta``, per-cell ``speedup`` in ``prefill``
    and ``decode``, and ``notes``.
    """
    if not records:
        return
    base = records[0]
    for rec in records:
        if rec.get("status") != "ok":
            continue
        notes: list[str] = []
        rec["ppl_delta"] = rec["perplexity"] - base["perplexity"]
        rec["ppl_ratio"] = _ratio(rec["perplexity"], base["perplexity"])
        if "domain_perplexity" in rec:  # perplexity.domains: the same ratio on each held-out text
            base_dom = base.get("domain_perplexity") or {}
            rec["domain_ppl_ratio"] = {d: _ratio(v, base_dom.get(d)) for d, v in rec["domain_perplexity"].items()}
        rec["kv_ratio"] = _ratio(rec["kv_bytes"], base["kv_bytes"])
        pk, bpk = rec.get("passkey_accuracy"), base.get("passkey_accuracy")
        rec["passkey_delta"] = None if pk is None or bpk is None else pk - bpk

        for cell in rec.get("prefill", []):
            b = _cell(base.get("prefill"), length=cell["length"], batch=cell["batch"])
            cell["speedup"] = _ratio(b and b["median_ms"], cell["median_ms"])
            cell["significant"] = None if b is None else not _overlap((cell["q1_ms"], cell["q3_ms"]), (b["q1_ms"], b["q3_ms"]))
        for cell in rec.get("decode", []):
            b = _cell(base.get("decode"), context=cell["context"], batch=cell["batch"])
            cell["speedup"] = _ratio(cell["tokens_per_s"], b and b["tokens_per_s"])
            cell["significant"] = None if b is None else not _overlap((cell["q1_ms"], cell["q3_ms"]), (b["q1_ms"], b["q3_ms"]))
        hp = _cell(rec.get("prefill"), length=rec.get("prefill_length"), batch=cfg.speed.prefill_batch) or {}
        hd = _cell(rec.get("decode"), context=rec.get("decode_context"), batch=rec.get("decode_batch")) or {}
        rec["prefill_speedup"], rec["prefill_significant"] = hp.get("speedup"), hp.get("significant")
        rec["decode_speedup"], rec["decode_significant"] = hd.get("speedup"), hd.get("significant")

        an = rec.get("kv_bytes_analytic")
        rec["kv_analytic_match"] = None if an is None else an in (rec["kv_bytes"], rec.get("kv_bytes_kv_only"))
        if rec is base:
            rec["notes"] = _baseline_notes(rec, cfg)
            continue
        if rec["prefill_significant"] is False:
            notes.append(f"prefill: no measurable difference at {rec['prefill_length']} tokens (IQRs overlap; "
                         f"ratio {rec['prefill_speedup']:.2f} is noise)")
        if rec["decode_significant"] is False:
            notes.append(f"decode: no measurable difference at context {rec['decode_context']}, batch "
                         f"{rec['decode_batch']} (IQRs overlap; ratio {rec['decode_speedup']:.2f} is noise)")
        if rec["kv_ratio"] is not None and abs(rec["kv_ratio"] - 1) < 1e-9:
            notes.append("KV cache unchanged")
        if an is None:
            notes.append("no analytic KV formula for this cache layout: measured bytes only")
        elif not rec["kv_analytic_match"]:
            notes.append(f"measured KV bytes ({rec['kv_bytes']}) differ from the analytic figure ({an})")
        elif rec["kv_bytes"] != an:
            notes.append(f"measured KV bytes include {rec['kv_bytes'] - an} bytes of per-token bookkeeping "
                         "(validity mask) beside the analytic K/V figure")
        if rec.get("kv_storage_bytes", 0) > rec["kv_bytes"]:
            notes.append(f"right after prefill the cache still pins {rec['kv_storage_bytes']} bytes of storage "
                         "(a view into the full prefill K/V) until the next decode step")
        rule = VARIANT_NOTES.get(rec.get("name")) or VARIANT_NOTES.get(_canonical(rec.get("name")))
        if rule is not None:
            notes += rule(rec, base, cfg)
        rec["notes"] = notes


def _canonical(name: Any) -> str | None:
    try:
        from ..registry import get_variant

        return get_variant(name).name
    except Exception:  # noqa: BLE001 - unknown names simply get no variant-specific notes
        return None


def _baseline_notes(rec: dict[str, Any], cfg: Any) -> list[str]:
    out = ["unconverted model: every ratio is against this row"]
    an = rec.get("kv_bytes_analytic")
    if an is not None and not rec.get("kv_analytic_match"):
        out.append(f"measured KV bytes ({rec['kv_bytes']}) differ from the analytic figure ({an})")
    return out


__all__ = ["VARIANT_NOTES", "annotate"]
