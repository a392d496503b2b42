"""Keep every figure quoted in README.md and results/*.md equal to the JSON it came from.

A Markdown file marks each generated part with HTML comments (invisible when rendered)::

    <!-- generated: results/eval_default/results.json eval_summary -->
    ...table written by the renderer `eval_summary`...
    <!-- end generated -->

    mean <!-- generated: gqa.json = smollm2.rows[strategy=mean].ppl |,.0f -->14,031<!-- end generated -->

The JSON path is relative to the Markdown file's folder. After it comes either a renderer (a name in
:data:`RENDERERS`, or ``path/to/script.py:function`` relative to the repository root, called with the loaded JSON)
or ``= field.path | format``: a value picked from the JSON (``.key``, ``[3]`` (a list position, or the key "3" of a
mapping), ``[key=value]`` picks the first list
item whose ``key`` prints as ``value``; ``[k=v,k2=v2]`` needs both) and formatted with a Python format spec.

    python -m hf_attn_swap.readme            # rewrite the generated parts of README.md and results/**/*.md
    python -m hf_attn_swap.readme --check    # exit 1 and print the diff if any of them disagrees with its JSON
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import inspect
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BLOCK = re.compile(r"<!-- generated: (?P<json>\S+) (?P<what>.+?) -->(?P<body>.*?)<!-- end generated -->", re.S)
_STEP = re.compile(r"\.?(?:(?P<key>[A-Za-z_][\w-]*)|\[(?P<index>-?\d+)\]|\[(?P<cond>[^=\]]+=[^\]]*)\])")


class GeneratedError(ValueError):
    """A marker names a missing JSON file, an unknown renderer, or a field that is not in the JSON."""


def pick(data: Any, path: str) -> Any:
    """Follow ``path`` (``a.b[2].c``, ``rows[strategy=mean].ppl``) into loaded JSON.

    Raises:
        GeneratedError: a step does not match (missing key, index out of range, no item with that value).
    """
    pos, cur = 0, data
    path = path.strip()
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None or m.end() == pos:
            raise GeneratedError(f"bad field path {path!r} at {path[pos:]!r}: use .key, [index] or [key=value]")
        pos = m.end()
        try:
            if m["key"] is not None:
                cur = cur[m["key"]]
            elif m["index"] is not None:  # a list position, or a numeric key of a mapping (JSON keys are strings)
                cur = cur[m["index"]] if isinstance(cur, dict) else cur[int(m["index"])]
            else:  # [key=value,key2=value2]: the first item matching every condition
                conds = [c.split("=", 1) for c in m["cond"].split(",")]
                cur = next(x for x in cur if all(str(x.get(k.strip())) == v.strip() for k, v in conds))
        except (KeyError, IndexError, TypeError, StopIteration, AttributeError):
            raise GeneratedError(f"field {path!r}: step {m.group(0)!r} matches nothing in the JSON") from None
    return cur


def _ppl(v: float) -> str:
    """Perplexity as the README prints it: 4 significant digits below 1000, whole numbers with commas above."""
    return f"{v:,.0f}" if v >= 1000 else f"{v:.4g}" if v >= 10 else f"{v:.3f}"


def _sig3(v: float) -> str:
    return f"{v:#.3g}".rstrip(".")


#: README labels of the default comparison's variants; the table shows these, in this order, where present.
EVAL_LABELS: dict[str, str] = {
    "baseline": "baseline ({kv} KV heads)",
    "mqa:strategy=mean": "mqa, mean-pooled (paper)",
    "mqa:strategy=fit": "mqa, `fit` (this package)",
    "sliding_window:window=256": "sliding_window 256",
    "linear": "linear (elu+1, untrained)",
    "linear:feature_map=hedgehog,window=64": "linear hedgehog + 64-token softmax window (untrained)",
    "flash": "flash (CPU SDPA flash)",
}


def eval_summary(records: list[dict[str, Any]]) -> str:
    """The README's table of the default comparison (``results.json`` of ``hf-attn-swap eval``)."""
    by = {r["variant"]: r for r in records if r.get("status") == "ok"}
    base = by["baseline"]
    head = (f"| variant | ppl | bits/byte | decode tok/s @{base['decode_context']}x{base['decode_batch']} "
            f"| KV MiB @{base['kv_tokens']} | passkey |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for spec, label in EVAL_LABELS.items():
        r = by.get(spec)
        if r is None:
            continue
        kv = (r.get("kv_heads") or ["?"])[0]
        if r is base:
            decode = f"{r['decode_tokens_per_s']:.1f}"
        else:
            decode = f"{r['decode_speedup']:.2f}x" + (" (n.s.)" if r.get("decode_significant") is False else "")
        lines.append(f"| {label.format(kv=kv)} | {_ppl(r['perplexity'])} | {r['bits_per_byte']:.3f} | {decode} "
                     f"| {_sig3(r['kv_bytes'] / 2**20)} | {r['passkey_accuracy']:.2f} |")
    return "\n".join(lines)


def uptrain_table(r: dict[str, Any]) -> str:
    """Command, per-stage table and recovery of an uptraining results JSON (``recipes/uptrain.py --results``)."""
    from .train.pipeline import log_gap_recovery

    lines = [f"`{r['command']}`", "",
             "| stage | held-out ppl | recovered share of the log-ppl gap | tokens so far | seconds so far |",
             "|---|---|---|---|---|", f"| original | {r['ppl_original']:.2f} | - | - | - |"]
    for c in r["curve"]:
        share = log_gap_recovery(r["ppl_original"], r["ppl_converted"], c["ppl"]) if r.get("ppl_converted") else None
        lines.append(f"| {c['stage']} | {c['ppl']:.2f} | {'-' if share is None else f'{share:.3f}'} | {c['tokens']} "
                     f"| {c['seconds']:.0f} |")
    rec = r.get("recovery")
    where = f" on {r['eval_domain']}" if r.get("eval_domain") else ""
    lines += ["", f"Recovered share of the log-perplexity gap{where}: {rec:.3f}" if rec is not None else "",
              f"Tokens: {r['tokens']}, seconds: {r['seconds']:.0f}"
              + (f", training CPU time {r['train_cpu_seconds'] / 60:.1f} min (evaluations excluded)."
                 if r.get("train_cpu_seconds") else ".")]
    if r.get("domains"):
        lines += ["", domain_table(r)]
    if r.get("mix_tokens"):
        totals: dict[str, int] = {}
        for per_source in r["mix_tokens"].values():
            for k, v in per_source.items():
                totals[k] = totals.get(k, 0) + v
        lines += ["", "Training text (tokens over all stages): " + ", ".join(f"{k} {v:,}" for k, v in totals.items())
                  + "."]
    prov = r.get("provenance")
    if prov:
        from .eval.report import provenance_lines

        lines += ["", *provenance_lines(prov)[2:-1]]
    return "\n".join(lines)


def domain_table(r: dict[str, Any]) -> str:
    """Per-domain held-out perplexity after each stage and the recovered share of the log gap (uptraining results
    with ``domains``), then the passkey accuracy after each stage when probed."""
    stages = [c["stage"] for c in r["curve"]]
    lines = ["| domain | held out | original | " + " | ".join(stages) + " | recovery | last / original |",
             "|---|---|---:|" + "---:|" * len(stages) + "---:|---:|"]
    for name, row in r["domains"].items():
        cells = " | ".join(_ppl(row[s]) if s in row else "-" for s in stages)
        rec = row.get("recovery")
        last = row.get(stages[-1]) if stages else None
        ratio = "-" if last is None else f"{last / row['original']:.2f}x"
        lines.append(f"| {name} | {'**yes**' if row.get('held_out') else 'no'} | {_ppl(row['original'])} | {cells} | "
                     f"{'-' if rec is None else f'{rec:.3f}'} | {ratio} |")
    if r.get("passkey"):
        cfg = r.get("config") or {}
        lines += ["", f"Passkey retrieval (plain format, lengths {cfg.get('passkey_lengths')}, depths 0/0.5/1, "
                  f"{cfg.get('passkey_trials')} keys each): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["passkey"].items()) + "."]
    return "\n".join(lines)


def eval_report(meta: dict[str, Any], path: Path) -> str:
    """The whole ``results.md`` of a comparison, from its ``run.json`` and the ``results.json`` beside it."""
    from .eval.report import markdown

    records = path.parent / "results.json"
    if not records.is_file():
        raise GeneratedError(f"eval_report needs {records} beside {path.name}")
    return markdown(json.loads(records.read_text()), meta)


def uptrain_goal(r: dict[str, Any], goal: float = 1.5) -> str:
    """Inline: how the uptrained perplexity compares with the recipes' goal (within 1.5x of the original)."""
    ratio = r["ppl_uptrained"] / r["ppl_original"]
    return (f"goal: within {goal}x of the original, i.e. ppl <= {goal * r['ppl_original']:.1f}: "
            f"{'reached' if ratio <= goal else 'NOT reached'}, {ratio:.2f}x")


#: renderers a marker can name; each takes the loaded JSON and returns Markdown (one line = inline text).
RENDERERS: dict[str, Callable[[Any], str]] = {
    "eval_summary": eval_summary, "eval_report": eval_report, "uptrain_table": uptrain_table,
    "uptrain_goal": uptrain_goal, "domain_table": domain_table,
    "uptrain_domains": lambda report: _domains_markdown(report),
}


def _domains_markdown(report: dict[str, Any]) -> str:
    from .train.domains import markdown

    return markdown(report)


def _renderer(name: str, root: Path) -> Callable[[Any], str]:
    if name in RENDERERS:
        return RENDERERS[name]
    file, _, func = name.partition(":")
    script = root / file
    if not func or not script.is_file():
        raise GeneratedError(f"unknown renderer {name!r}: use one of {sorted(RENDERERS)} or path/to/script.py:function")
    spec = importlib.util.spec_from_file_location(f"_hf_attn_swap_render_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, func)


def render(text: str, where: Path, root: Path) -> str:
    """Return ``text`` with every generated part recomputed from its JSON.

    Args:
        text: A Markdown document.
        where: The folder JSON paths are relative to (the document's own).
        root: The repository root (for ``script.py:function`` renderers).

    Raises:
        GeneratedError: a marker cannot be evaluated; the message names it.
    """
    cache: dict[Path, Any] = {}

    def one(m: re.Match[str]) -> str:
        path = (where / m["json"]).resolve()
        if path not in cache:
            if not path.is_file():
                raise GeneratedError(f"{m.group(0)[:80]}...: {path} does not exist")
            cache[path] = json.loads(path.read_text())
        what = m["what"].strip()
        if what.startswith("="):
            field, _, fmt = what[1:].partition("|")
            value = pick(cache[path], field)
            try:
                body = format(value, fmt.strip())
            except (TypeError, ValueError) as exc:
                raise GeneratedError(f"cannot format {field.strip()}={value!r} with {fmt.strip()!r}: {exc}") from None
        else:
            fn = _renderer(what, root)
            # a renderer that also reads files beside its JSON (eval_report) takes the path too
            args = (cache[path], path) if "path" in inspect.signature(fn).parameters else (cache[path],)
            text = fn(*args).strip("\n")
            body = f"\n{text}\n" if "\n" in text else text  # one line: an inline part of a sentence
        return f"<!-- generated: {m['json']} {m['what']} -->{body}<!-- end generated -->"

    return BLOCK.sub(one, text)


def default_files(root: Path) -> list[Path]:
    """README.md and every Markdown file under results/ that has a generated part."""
    files = [root / "README.md", *sorted((root / "results").rglob("*.md"))]
    return [f for f in files if f.is_file() and "<!-- generated:" in f.read_text()]


def main(argv: list[str] | None = None) -> int:
    """Command line: rewrite (default) or ``--check`` the generated parts; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m hf_attn_swap.readme", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and results/**/*.md)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if anything is stale")
    p.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: the current folder)")
    a = p.parse_args(argv)
    root = a.root.resolve()
    stale = 0
    for file in a.files or default_files(root):
        old = file.read_text()
        try:
            new = render(old, file.resolve().parent, root)
        except GeneratedError as exc:
            sys.stderr.write(f"{file}: {exc}\n")
            return 2
        if new == old:
            continue
        stale += 1
        if a.check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       f"{file} (as committed)", f"{file} (from its JSON)"))
        else:
            file.write_text(new)
            sys.stdout.write(f"updated {file}\n")
    if a.check and stale:
        sys.stderr.write(f"{stale} file(s) disagree with their JSON: run python -m hf_attn_swap.readme\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
