"""Reports of a comparison: ``results.json`` (list of records), ``run.json`` (config, environment, runtime, provenance),
``results.csv`` (one flat row per variant), ``results.md`` (tables + notes) and ``pareto.png`` (perplexity against
decode tokens/s, marker area proportional to KV bytes).

Record fields (``ok`` records; ``skipped``/``error`` ones carry ``variant``, ``status``, ``reason``, ``notes``):
``variant`` (spec string), ``perplexity`` (token-level), ``bits_per_byte``, ``word_perplexity``, ``ppl_delta``,
``ppl_ratio``, ``prefill_ms`` (median at ``prefill_length``), ``prefill_speedup``, ``decode_tokens_per_s`` (at
``decode_context``, ``decode_batch``), ``decode_speedup``, ``*_significant``, ``kv_bytes`` (measured, at ``kv_tokens``),
``kv_bytes_analytic``, ``kv_ratio``, ``passkey_accuracy``, ``passkey`` (per cell), ``peak_mem_*``, ``env`` (device,
dtype, threads, versions), ``notes``, per-cell ``prefill``/``decode`` lists, timings of each phase.
With ``perplexity.domains``: ``domain_perplexity`` and ``domain_ppl_ratio`` (``{domain: value}``; CSV columns
``ppl_<domain>``, ``ppl_ratio_<domain>``); uptrained rows also ``recovery`` and ``domain_recovery``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from .plot import pareto_front, plot_pareto  # noqa: F401 - part of this module's API since the start

logger = logging.getLogger(__name__)

CSV_FIELDS = [
    "variant", "status", "perplexity", "ppl_delta", "ppl_ratio", "bits_per_byte", "word_perplexity",
    "prefill_length", "prefill_ms", "prefill_speedup", "prefill_significant",
    "decode_context", "decode_batch", "decode_tokens_per_s", "decode_speedup", "decode_significant",
    "kv_tokens", "kv_bytes", "kv_bytes_analytic", "kv_ratio", "passkey_accuracy",
    "peak_mem_bytes", "peak_mem_delta_bytes", "peak_mem_kind", "device", "dtype", "threads", "runtime_s", "reason", "notes",
]


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _clean(o: Any) -> Any:
    """inf/nan -> None (JSON has neither)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def flat_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One CSV row: the headline fields, every decode/prefill cell, every passkey cell."""
    env = rec.get("env") or {}
    row = {k: rec.get(k) for k in CSV_FIELDS}
    row.update(device=env.get("device"), dtype=env.get("dtype"), threads=env.get("threads"))
    row["notes"] = " | ".join(rec.get("notes") or [])
    for c in rec.get("prefill") or []:
        row[f"prefill_ms_L{c['length']}_b{c['batch']}"] = c["median_ms"]
    for c in rec.get("decode") or []:
        row[f"decode_tps_c{c['context']}_b{c['batch']}"] = c["tokens_per_s"]
    for cell, acc in (rec.get("passkey") or {}).items():
        row[f"passkey_{cell}"] = acc
    if "recovery" in rec:
        row["recovery"] = rec["recovery"]
    for prefix, key in (("ppl", "domain_perplexity"), ("ppl_ratio", "domain_ppl_ratio"), ("recovery", "domain_recovery")):
        for domain, v in (rec.get(key) or {}).items():
            row[f"{prefix}_{domain}"] = v
    return row


def write_json(records: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(_clean(records), indent=2, default=_json_default) + "\n")


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    rows = [flat_row(r) for r in records]
    extra = sorted({k for r in rows for k in r} - set(CSV_FIELDS))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS + extra)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_csv(v) for k, v in r.items()})


def _fmt_csv(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return v


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return fmt.format(v)


def _ppl(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 1000 else f"{v:.3g}"


def _speedup(v: Any, significant: Any, inner: bool = False) -> str:
    if v is None:
        return "-"
    s = f"{v:.2f}x"
    if significant is False:
        return s + (" n.s." if inner else " (n.s.)")
    return s


def _mib(b: Any) -> str:
    return "-" if b is None else (f"{b / 2**20:.2f}" if b >= 2**20 / 100 else f"{b / 1024:.1f} KiB")


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown report: headline table, decode cells, passkey grid, notes, skipped variants, environment."""
    ok = [r for r in records if r.get("status") == "ok"]
    cfg = meta.get("config", {})
    env = meta.get("environment", {})
    base = ok[0] if ok else {}
    lines = [f"# Attention variants of `{cfg.get('model')}`", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    if meta.get("run_on"):
        ro = meta["run_on"]
        lines += [f"Ran on: {ro['device']}, {ro['dtype']} (the baseline, every variant and the token "
                  f"ids); "
                  f"{ro['eval_threads']} thread(s) for perplexity, passkey and calibration, {ro['speed_threads']} for "
                  "timing.", ""]
    p = cfg.get("perplexity", {})
    lines += [
        f"Perplexity: {meta.get('eval_tokens')} tokens of `{p.get('corpus')}` ({p.get('split')} split), context "
        f"{p.get('context')}, {(base.get('ppl_detail') or {}).get('stride', p.get('stride') or p.get('context'))} new "
        f"tokens scored per window. Speed: {env.get('device')} "
        f"({env.get('device_name')}), {env.get('dtype')}, {base.get('env', {}).get('threads', env.get('threads'))} "
        f"thread(s), median of repeats{', all variants timed round-robin' if base.get('speed_interleaved') else ''}; "
        f"ratios vs `baseline`, `(n.s.)` = within the measured spread (IQRs overlap). "
        f"Total runtime {meta.get('runtime_s')} s.",
        "",
    ]
    if meta.get("domain_tokens"):
        lines += ["Perplexity per domain: the validation split of each, same context and stride; tokens: "
                  + ", ".join(f"`{d}` {n}" for d, n in meta["domain_tokens"].items()) + ".", ""]
    pl = base.get("prefill_length")
    dc, db = base.get("decode_context"), base.get("decode_batch")
    kt = base.get("kv_tokens")
    lines += [
        f"| variant | ppl | Δppl | bits/byte | prefill ms @{pl} | prefill × | decode tok/s @{dc}×{db} | decode × "
        f"| KV MiB @{kt} | KV × | passkey |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {_ppl(r['perplexity'])} | {_num(r.get('ppl_delta'), '{:+.2f}') if r is not base else '-'} "
            f"| {_num(r.get('bits_per_byte'), '{:.3f}')} | {_num(r.get('prefill_ms'), '{:.0f}')} "
            f"| {_speedup(r.get('prefill_speedup'), r.get('prefill_significant')) if r is not base else '1'} "
            f"| {_num(r.get('decode_tokens_per_s'), '{:.1f}')} "
            f"| {_speedup(r.get('decode_speedup'), r.get('decode_significant')) if r is not base else '1'} "
            f"| {_mib(r.get('kv_bytes'))} | {_num(r.get('kv_ratio'))} "
            f"| {_num(r.get('passkey_accuracy'), '{:.2f}')} |"
        )
    lines.append("")
    lines.append(f"Normalisation: {meta.get('normalisation', '')}.")
    lines.append("")

    if ok and ok[0].get("decode"):
        cells = [(c["context"], c["batch"]) for c in ok[0]["decode"]]
        lines += ["## Decode tokens/s by context × batch (speed-up vs baseline)", ""]
        lines.append("| variant | " + " | ".join(f"{c}×{b}" for c, b in cells) + " |")
        lines.append("|---|" + "---:|" * len(cells))
        for r in ok:
            vals = []
            for c, b in cells:
                cell = next((x for x in r.get("decode", []) if x["context"] == c and x["batch"] == b), None)
                if cell is None:
                    vals.append("-")
                else:
                    sp = "" if r is ok[0] else f" ({_speedup(cell.get('speedup'), cell.get('significant'), True)})"
                    vals.append(f"{cell['tokens_per_s']:.1f}{sp}")
            lines.append(f"| {r['variant']} | " + " | ".join(vals) + " |")
        lines.append("")
        pcells = [c["length"] for c in ok[0].get("prefill", [])]
        lines += ["## Prefill latency, ms (speed-up vs baseline)", ""]
        lines.append("| variant | " + " | ".join(f"{n} tokens" for n in pcells) + " |")
        lines.append("|---|" + "---:|" * len(pcells))
        for r in ok:
            vals = []
            for n in pcells:
                cell = next((x for x in r.get("prefill", []) if x["length"] == n), None)
                if cell is None:
                    vals.append("-")
                else:
                    sp = "" if r is ok[0] else f" ({_speedup(cell.get('speedup'), cell.get('significant'), True)})"
                    vals.append(f"{cell['median_ms']:.0f} [{cell['q1_ms']:.0f}-{cell['q3_ms']:.0f}]{sp}")
            lines.append(f"| {r['variant']} | " + " | ".join(vals) + " |")
        lines.append("")

    lines += domain_tables(ok)

    pk_cells = list((ok[0].get("passkey") or {}).keys()) if ok else []
    if pk_cells:
        lines += ["## Passkey retrieval accuracy (length@depth)", ""]
        lines.append("| variant | " + " | ".join(pk_cells) + " |")
        lines.append("|---|" + "---:|" * len(pk_cells))
        for r in ok:
            grid = r.get("passkey") or {}
            lines.append(f"| {r['variant']} | " + " | ".join(_num(grid.get(c), "{:.2f}") for c in pk_cells) + " |")
        lines.append("")

    lines += ["## Notes", ""]
    for r in records:
        for n in r.get("notes") or []:
            lines.append(f"- **{r['variant']}**: {n}")
    lines.append("")
    lines += provenance_lines(meta.get("provenance"))
    lines += [
        "## Environment",
        "",
        "```",
        json.dumps(env, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def domain_tables(ok: list[dict[str, Any]]) -> list[str]:
    """"Perplexity per domain" (every variant on each ``perplexity.domains`` text, ratio to the baseline) and, when
    uptrained checkpoints were evaluated, "Recovery per domain"; no lines without domains."""
    domains = list((ok[0].get("domain_perplexity") or {}).keys()) if ok else []
    if not domains:
        return []
    lines = ["## Perplexity per domain (validation splits; ratio to baseline)", "",
             "| variant | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for r in ok:
        ppl, ratio = r.get("domain_perplexity") or {}, r.get("domain_ppl_ratio") or {}
        cells = [_ppl(ppl.get(d)) + ("" if r is ok[0] or ratio.get(d) is None else f" ({ratio[d]:.2f}x)")
                 for d in domains]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    lines.append("")
    uptrained = [r for r in ok if r.get("domain_recovery") is not None]
    if uptrained:
        lines += ["## Recovery per domain", "",
                  "Share of the log-perplexity gap between the baseline and the untrained conversion that the "
                  "uptrained checkpoint won back (1 = all, 0 = none, negative = worse than the conversion).", "",
                  "| checkpoint | main corpus | " + " | ".join(domains) + " |", "|---|---:|" + "---:|" * len(domains)]
        for r in uptrained:
            rec = r["domain_recovery"]
            lines.append(f"| {r['variant']} | {_num(r.get('recovery'), '{:.3f}')} | "
                         + " | ".join(_num(rec.get(d), "{:.3f}") for d in domains) + " |")
        lines.append("")
    return lines


def huge_pages_note(pages: dict[str, Any] | None) -> str:
    """``; large tensors on 2 MiB pages`` or ``on 4 KiB pages`` (:func:`hf_attn_swap.provenance.huge_pages`), '' for
    records from before it was kept."""
    if not pages:
        return ""
    return "; large tensors on " + ("2 MiB" if pages.get("tensors") else "4 KiB") + " pages"


def provenance_lines(prov: dict[str, Any] | None) -> list[str]:
    """A short "Provenance" section (code revision, weights, text) from :func:`hf_attn_swap.provenance.provenance`;
    the full record is in the JSON."""
    if not prov:
        return []
    from ..provenance import weights_summary

    git = prov.get("git") or {}
    code = (f"git {git['commit'][:12]}{' with uncommitted changes' if git.get('dirty') else ''}"
            if git.get("commit") else f"not a git checkout ({git.get('reason')})")
    versions = prov.get("versions") or {}
    lines = ["## Provenance", "",
             f"- Code: hf_attn_swap {versions.get('hf-attn-swap')}, {code}; run {prov.get('date_utc')} on "
             f"{prov.get('cpu')} ({prov.get('cpu_count')} CPUs, load average {prov.get('load_average')})"
             f"{huge_pages_note(prov.get('huge_pages'))}."]
    lines += [f"- Weights: {weights_summary(m)}." for m in prov.get("models") or []]
    for c in prov.get("corpora") or []:
        where = c.get("package") or c.get("path")
        digest = f"{c.get('n_files')} file(s), sha256 {c['sha256'][:12]}" if c.get("sha256") else c.get("reason")
        lines.append(f"- Text `{c.get('name', where)}`: {where}, {digest}.")
    return lines + [""]


def write_generated(data: dict[str, Any], stem: str | Path, renderer: str, markdown: Any) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (``data``) and ``<stem>.md`` (``markdown(data)``, marked as generated from that JSON by
    ``renderer``, so ``python -m hf_attn_swap.readme --check`` re-renders it exactly); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    js, md = stem.with_suffix(".json"), stem.with_suffix(".md")
    js.write_text(json.dumps(data, indent=2) + "\n")
    body = markdown(data).strip("\n")  # as python -m hf_attn_swap.readme renders it
    md.write_text(f"<!-- generated: {js.name} {renderer} -->\n{body}\n<!-- end generated -->\n")
    return js, md


def write_reports(records: list[dict[str, Any]], meta: dict[str, Any], out: str | Path, *, plot: bool = True) -> dict[str, Path]:
    """Write every output into ``out`` (created); returns ``{kind: path}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md", "run": out / "run.json"}
    write_json(records, paths["json"])
    write_csv(records, paths["csv"])
    # marked as generated from run.json (+ results.json): python -m hf_attn_swap.readme --check re-renders it
    paths["md"].write_text(f"<!-- generated: run.json eval_report -->\n{markdown(records, meta).rstrip()}\n"
                           "<!-- end generated -->\n")
    paths["run"].write_text(json.dumps(_clean(meta), indent=2, default=_json_default) + "\n")
    if plot:
        png = out / "pareto.png"
        title = f"{meta.get('config', {}).get('model')}: perplexity vs decode speed"
        if plot_pareto(records, png, title):
            paths["png"] = png
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


__all__ = ["CSV_FIELDS", "domain_tables", "flat_row", "markdown", "pareto_front", "plot_pareto", "provenance_lines", "write_reports"]
