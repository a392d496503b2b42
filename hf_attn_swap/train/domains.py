"""Uptraining across domains (issue 15): run uptraining configs and report recovery per domain, held-out first.

``recipes/uptrain_domains.py`` is the command. A config names the runs and the goals::

    runs:
      - {name: mqa, config: recipes/configs/uptrain_smollm2_mqa.yaml, results: results/uptrain_smollm2_mqa.json}
    goals: {held_out_recovery: 0.9, min_domain_recovery: 0.85, passkey: 0.9, train_cpu_minutes: 30}

Each run writes the same ``results/<run>.json`` + ``.md`` as ``recipes/uptrain.py --results``; the summary
(``uptrain_domains.json``, ``.md`` generated from it, ``.png``) says per run which goals are reached, computed here
from the figures, never typed in.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: the issue's goals for the default recipe (SmolLM2 3 -> 1 KV heads).
DEFAULT_GOALS: dict[str, float] = {"held_out_recovery": 0.9, "min_domain_recovery": 0.85, "passkey": 0.9,
                                   "train_cpu_minutes": 30.0}


class DomainsError(ValueError):
    """A bad uptrain_domains config: one line saying what is allowed."""


def load_config(path: str | Path) -> tuple[list[dict[str, str]], dict[str, float]]:
    """``(runs, goals)`` from the YAML, checked: every run has a unique name, an existing config and a results path.

    Raises:
        DomainsError: what is wrong, with what is allowed.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DomainsError(f"no config file at {path}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"runs", "goals"}
    if unknown:
        raise DomainsError(f"unknown key(s) {sorted(unknown)} in {path}; allowed: runs, goals")
    runs = data.get("runs") or []
    if not isinstance(runs, list) or not runs:
        raise DomainsError(f"{path}: runs must be a non-empty list of {{name, config, results}}")
    names = set()
    for run in runs:
        if not isinstance(run, dict) or set(run) != {"name", "config", "results"}:
            raise DomainsError(f"{path}: each run is exactly {{name, config, results}}, got {run!r}")
        if run["name"] in names:
            raise DomainsError(f"{path}: run name {run['name']!r} appears twice")
        names.add(run["name"])
        if not Path(run["config"]).is_file():
            raise DomainsError(f"{path}: run {run['name']!r}: no uptrain config at {run['config']}")
    goals = {**DEFAULT_GOALS, **(data.get("goals") or {})}
    bad = set(goals) - set(DEFAULT_GOALS)
    if bad:
        raise DomainsError(f"{path}: unknown goal(s) {sorted(bad)}; allowed: {', '.join(DEFAULT_GOALS)}")
    return runs, goals


def write_run_results(result: dict[str, Any], path: str | Path, command: str) -> Path:
    """Write an uptraining result as ``recipes/uptrain.py --results`` does: the JSON (with the command and machine) and
    a Markdown summary beside it, generated from the JSON."""
    import torch

    from ..readme import uptrain_table

    out = dict(result)
    out["command"] = command
    out["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                      "torch": torch.__version__}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    md = path.with_suffix(".md")
    end = "<!-- end generated -->\n"
    # prose written by hand under the generated block of a previous run stays (it says what the figures mean)
    kept = md.read_text().split(end, 1)[1] if md.is_file() and end in md.read_text() else ""
    md.write_text(f"<!-- generated: {path.name} uptrain_table -->\n{uptrain_table(out)}\n{end}{kept}")
    return path


def summarize(result: dict[str, Any], goals: dict[str, float]) -> dict[str, Any]:
    """The headline figures of one run and each goal checked (``None`` where the run did not measure it)."""
    domains = result.get("domains") or {}
    held = [n for n, row in domains.items() if row.get("held_out")]
    recoveries = {n: row.get("recovery") for n, row in domains.items()}
    passkey = result.get("passkey") or {}
    last_stage = result["curve"][-1]["stage"] if result.get("curve") else None
    summary: dict[str, Any] = {
        "eval_domain": result.get("eval_domain"),
        "held_out": held,
        "held_out_recovery": recoveries.get(held[0]) if held else None,
        "in_domain_recoveries": {n: r for n, r in recoveries.items() if n not in held},
        "min_domain_recovery": min((r for r in recoveries.values() if r is not None), default=None),
        "passkey_original": passkey.get("original"),
        "passkey": passkey.get(last_stage) if last_stage else None,
        "train_cpu_minutes": (result.get("train_cpu_seconds") or 0) / 60 or None,
        "tokens": result.get("tokens"),
        "variant": _variant_label(result.get("config") or {}),
        # perplexity after the last stage on each held-out domain (with the original's): what compares runs whose
        # conversions start from different places (recovery is relative to each run's own converted model)
        "held_out_ppl": {n: domains[n].get(last_stage) for n in held} if last_stage else {},
        "held_out_original": {n: domains[n].get("original") for n in held},
    }
    checks = {
        "held_out_recovery": (summary["held_out_recovery"], ">="),
        "min_domain_recovery": (summary["min_domain_recovery"], ">="),
        "passkey": (summary["passkey"], ">="),
        "train_cpu_minutes": (summary["train_cpu_minutes"], "<="),
    }
    summary["goals"] = {
        k: None if v is None else bool(v >= goals[k] if op == ">=" else v <= goals[k]) for k, (v, op) in checks.items()
    }
    return summary


def _variant_label(cfg: dict[str, Any]) -> str | None:
    if not cfg.get("variant"):
        return None
    opts = cfg.get("variant_options") or {}
    return cfg["variant"] + ("" if not opts else ":" + ",".join(f"{k}={v}" for k, v in opts.items()))


def same_config(saved: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a run's saved config is ``current``, with ``device: auto`` read as the device it means here (a run
    saved before ``auto`` became the default recorded ``cpu``), and an option the saved config predates read as its
    default (a run saved before ``mixed_precision`` existed ran in float32, which is its default ``no``)."""
    from ..devices import resolve_device
    from .config import UptrainConfig

    if saved is None:
        return False
    defaults = UptrainConfig().to_dict()

    def norm(c: dict[str, Any]) -> dict[str, Any]:
        c = {**{k: v for k, v in defaults.items() if k not in c}, **c}
        return {**c, "device": str(resolve_device(c.get("device") or "auto"))}

    try:
        return norm(saved) == norm(current)
    except ValueError:  # a device this machine does not have: not the same run
        return False


def run_domains(config: str | Path, out: str | Path, *, command: str, reuse: bool = False,
                only: list[str] | None = None) -> dict[str, Any]:
    """Run (or reuse) every uptraining run of ``config`` and write ``out.{json,md,png}``.

    Raises:
        DomainsError: a bad config, or ``only`` naming a run that is not in it.
    """
    from ..provenance import provenance
    from .config import UptrainConfig
    from .pipeline import uptrain

    runs, goals = load_config(config)
    if only:
        missing = sorted(set(only) - {r["name"] for r in runs})
        if missing:
            raise DomainsError(f"--only names unknown run(s) {missing}; runs: {', '.join(r['name'] for r in runs)}")
    cfgs = {r["name"]: UptrainConfig.load(r["config"]) for r in runs}  # every config checked before any training
    report: dict[str, Any] = {"command": command, "goals": goals, "runs": {}}
    run_results: list[dict[str, Any]] = []
    for run in runs:
        name, path = run["name"], Path(run["results"])
        cfg = cfgs[name]
        previous = json.loads(path.read_text()) if path.is_file() else None
        wanted = only is None or name in only
        if previous is not None and (not wanted or reuse) and same_config(previous.get("config"), cfg.to_dict()):
            logger.info("uptrain_domains: %s: reusing %s", name, path)
            result = previous
        elif not wanted or reuse:
            # --reuse reports what has run; it never starts a training run (that takes half an hour)
            why = "not selected by --only" if not wanted else "--reuse"
            logger.warning("uptrain_domains: %s: %s and %s does not hold its current config: left out of the report",
                           name, why, path)
            continue
        else:
            logger.info("uptrain_domains: %s: uptraining with %s", name, run["config"])
            result = uptrain(cfg, overwrite=True).to_dict()  # the configs' own run folders under runs/
            write_run_results(result, path, f"{command}  # run {name}: {run['config']}")
            result = json.loads(path.read_text())
        run_results.append(result)
        report["runs"][name] = {"config": run["config"], "results": str(path), **summarize(result, goals),
                                "domains": result.get("domains"), "passkey_by_stage": result.get("passkey"),
                                "curve": [{k: c.get(k) for k in ("stage", "tokens", "train_cpu_seconds", "domains",
                                                                 "passkey")} for c in result.get("curve", [])],
                                "git": (result.get("provenance") or {}).get("git")}
    report["provenance"] = provenance()
    # This report is an aggregate: the weights, text, dtype and device are those of the runs it quotes (each run's
    # own JSON keeps its full record); this process loaded none of them.
    for key in ("models", "corpora"):
        merged: list[Any] = []
        for result in run_results:
            for item in ((result.get("provenance") or {}).get(key) or []):
                if item not in merged:
                    merged.append(item)
        report["provenance"][key] = merged
    firsts = [r.get("provenance") or {} for r in run_results]
    for key in ("device", "dtype", "torch_threads"):
        values = {json.dumps(f.get(key)) for f in firsts if f.get(key) is not None}
        report["provenance"][key] = json.loads(values.pop()) if len(values) == 1 else sorted(values) or None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    js.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"<!-- generated: {js.name} uptrain_domains -->\n{markdown(report)}\n"
                                      "<!-- end generated -->\n")
    plot(report, out.with_suffix(".png"))
    return report


def _f(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("reached" if ok else "**not reached**")


def markdown(report: dict[str, Any]) -> str:
    """``uptrain_domains.md`` from its JSON."""
    from ..eval.report import provenance_lines
    from ..readme import domain_table

    g = report["goals"]
    lines = ["# Uptraining across domains", "", f"Command: `{report['command']}`", "",
             "Recovery = share of the log-perplexity gap (original -> converted) won back, per domain, on each corpus's "
             "validation split (disjoint from every train split). A held-out domain is never in any stage's training "
             "text. Goals (issue 15): held-out recovery >= "
             f"{g['held_out_recovery']}, every domain >= {g['min_domain_recovery']}, passkey >= {g['passkey']}, "
             f"training <= {g['train_cpu_minutes']:g} CPU-minutes.", "",
             "| run | held out | held-out recovery | lowest domain recovery | passkey (original) | training CPU min "
             "| goals |", "|---|---|---:|---:|---:|---:|---|"]
    for name, r in report["runs"].items():
        goals = "; ".join(f"{k.replace('_', ' ')} {_mark(v)}" for k, v in r["goals"].items())
        lines.append(f"| {name} | {', '.join(r['held_out']) or '-'} | {_f(r['held_out_recovery'])} | "
                     f"{_f(r['min_domain_recovery'])} | {_f(r['passkey'], '.2f')} ({_f(r['passkey_original'], '.2f')}) "
                     f"| {_f(r['train_cpu_minutes'], '.1f')} | {goals} |")
    held = list(dict.fromkeys(n for r in report["runs"].values() for n in r.get("held_out_ppl") or {}))
    if held:
        lines += ["", "Perplexity after uptraining on the held-out domains (lower is better; this compares variants whose "
                  "conversions start from different places, which recovery, relative to each run's own converted "
                  "model, does not):", "",
                  "| run | variant | " + " | ".join(f"{n} (original)" for n in held) + " | passkey | training CPU min |",
                  "|---|---|" + "---:|" * len(held) + "---:|---:|"]
        for name, r in report["runs"].items():
            ppl, orig = r.get("held_out_ppl") or {}, r.get("held_out_original") or {}
            cells = [f"{_f(ppl.get(n), '.1f')} ({_f(orig.get(n), '.1f')})" for n in held]
            lines.append(f"| {name} | {r.get('variant') or '-'} | " + " | ".join(cells)
                         + f" | {_f(r['passkey'], '.2f')} | {_f(r['train_cpu_minutes'], '.1f')} |")
    for name, r in report["runs"].items():
        lines += ["", f"## {name} (`{r['config']}`, details in `{r['results']}`)", ""]
        if r.get("domains"):
            lines.append(domain_table({"curve": r["curve"], "domains": r["domains"],
                                       "passkey": r.get("passkey_by_stage"), "config": _config_of(r)}))
    lines += ["", "![recovery per domain against training tokens](uptrain_domains.png)", ""]
    lines += provenance_lines(report.get("provenance"))
    return "\n".join(lines).rstrip()


def _config_of(run: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(Path(run["results"]).read_text()).get("config") or {}
    except (OSError, ValueError):
        return {}


def plot(report: dict[str, Any], path: str | Path) -> None:
    """One panel per run: recovery per domain against training tokens at the end of each stage (held-out domains
    dashed), and passkey accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pipeline import log_gap_recovery

    runs = report["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], runs.items()):
        curve = r["curve"]
        for dom, row in (r.get("domains") or {}).items():
            xs, ys = [], []
            for c in curve:
                if dom in (c.get("domains") or {}) and "converted" in row:
                    xs.append(c["tokens"])
                    ys.append(log_gap_recovery(row["original"], row["converted"], c["domains"][dom]))
            ax.plot(xs, ys, "--" if row.get("held_out") else "-", marker="o",
                    label=f"{dom}{' (held out)' if row.get('held_out') else ''}")
        pk = [(c["tokens"], c["passkey"]) for c in curve if c.get("passkey") is not None]
        if pk:
            ax.plot(*zip(*pk), ":", color="black", marker="s", label="passkey accuracy")
        for c in curve:
            ax.annotate(c["stage"], (c["tokens"], 0.02), fontsize=7, rotation=90, va="bottom")
        ax.axhline(report["goals"]["held_out_recovery"], color="grey", lw=0.8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(name)
        ax.set_xlabel("training tokens (cumulative, end of each stage)")
        ax.set_ylabel("recovered share of the log-ppl gap")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
