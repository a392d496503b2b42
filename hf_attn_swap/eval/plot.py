"""The comparison's plot, ``pareto.png``: perplexity against decode tokens/s, with the spread the results carry.

* Error bars: the decode speed's interquartile range at the headline cell (quartiles of the timed single-token steps,
  recorded by :mod:`hf_attn_swap.eval.speed` as ``tokens_per_s_q1``/``_q3``). Perplexity has no bar: it is one
  deterministic pass over the same text for every variant (no sampling), and the results record no per-window spread.
* The Pareto line only steps between points whose speed IQRs do not overlap: the significance the table uses
  (:mod:`hf_attn_swap.eval.notes`, ``n.s.`` = IQRs overlap). A speed difference the table calls ``n.s.`` is a tie.
* Labels are placed greedily from their rendered bounding boxes so that no two overlap, nor cover another point.
* The title says what was trained: the comparison converts variants and never trains them, unless a record says so.

Redraw from a results folder without rerunning anything: ``python -m hf_attn_swap.eval.plot results/eval_default``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

# Label offsets tried around a point, in typographic points: nearest ring first, right/above before left/below.
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
_RADII = [6, 12, 20, 30, 42, 56, 72, 90]
_PAD_PX = 2.0  # gap kept between label boxes, in pixels
_POINT_PX = 4.0  # least half-size of the box kept free around a data point (its marker's when larger)


def _ties(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Intervals overlap: the table's ``n.s.`` (see :mod:`hf_attn_swap.eval.notes`)."""
    return a[0] <= b[1] and b[0] <= a[1]


def pareto_front(points: Sequence[tuple[float, float]], spreads: Sequence[tuple[float, float] | None] | None = None) -> list[int]:
    """Indices of the non-dominated points (higher x = faster is better, lower y = perplexity is better), by x.

    A point is as fast as another when it is faster or their x intervals overlap (``spreads``: the (q1, q3) of each
    x; None or a missing one is the point itself), and faster only when it is faster and the intervals do not overlap.
    ``j`` dominates ``i`` when it is as fast and has lower y, or has equal y and is faster. Equal y with overlapping x is
    a tie: the first of them in input order stays (the baseline comes first in a comparison). So two points on the
    front always differ in y and in x beyond the spread, and the line never steps on a difference within the noise.

    Args:
        points: ``(x, y)`` per point.
        spreads: optional ``(low, high)`` interval of each x.

    Returns:
        Indices of the front, sorted by x.
    """
    n = len(points)
    iv = [(spreads[i] if spreads and spreads[i] else (points[i][0], points[i][0])) for i in range(n)]

    def as_fast(j: int, i: int) -> bool:
        return points[j][0] >= points[i][0] or _ties(iv[j], iv[i])

    def faster(j: int, i: int) -> bool:
        return points[j][0] > points[i][0] and not _ties(iv[j], iv[i])

    def strictly(j: int, i: int) -> bool:
        (_, yj), (_, yi) = points[j], points[i]
        return (yj < yi and as_fast(j, i)) or (yj == yi and faster(j, i))

    beaten = {i for i in range(n) if any(strictly(j, i) for j in range(n) if j != i)}
    front = []
    for i in range(n):
        if i in beaten:
            continue
        tied_earlier = any(j < i and j not in beaten and points[j][1] == points[i][1] and _ties(iv[j], iv[i])
                           for j in range(n))
        if not tied_earlier:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def decode_spread(rec: dict[str, Any]) -> tuple[float, float] | None:
    """(q1, q3) of the decode tokens/s at the record's headline cell, or None when the record has no quartiles."""
    for cell in rec.get("decode") or []:
        if cell.get("context") == rec.get("decode_context") and cell.get("batch") == rec.get("decode_batch"):
            lo, hi = cell.get("tokens_per_s_q1"), cell.get("tokens_per_s_q3")
            if lo is not None and hi is not None:
                return float(lo), float(hi)
    return None


def _trained(rec: dict[str, Any]) -> bool:
    return bool(rec.get("trained") or rec.get("train_tokens") or rec.get("uptrained"))


def training_caption(records: Sequence[dict[str, Any]]) -> str:
    """What was trained and what was not, from the records.

    The comparison recipe converts each variant from the baseline checkpoint and trains nothing; a record that was
    trained says so with ``trained`` / ``train_tokens`` / ``uptrained``.
    """
    variants = [r for r in records if r.get("variant") != "baseline"]
    trained = [r["variant"] for r in variants if _trained(r)]
    if not variants:
        return "baseline only"
    if not trained:
        return "all variants untrained (converted from the baseline, no uptraining)"
    untrained = [r["variant"] for r in variants if not _trained(r)]
    if not untrained:
        return "all variants trained after conversion: " + ", ".join(trained)
    return f"trained: {', '.join(trained)}; untrained (conversion only): {', '.join(untrained)}"


def _boxes_overlap(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def place_labels(ax: Any, labels: Sequence[str], xy: Sequence[tuple[float, float]],
                 colors: Sequence[Any] | None = None, fontsize: float = 8,
                 marker_sizes: Sequence[float] | None = None) -> list[Any]:
    """Annotate each point with its label where the label's rendered box overlaps no other label and no marker.

    Greedy: for each point in turn, offsets on growing rings around it are tried until the text's box (measured by
    the figure's renderer, padded by a couple of pixels) is inside the axes and clear of every box already placed and
    of every data point. Call it after the axes' limits, scales and the figure layout are final: the boxes are in
    display coordinates. A label that fits nowhere inside the axes goes to the first clear spot outside; one that fits
    nowhere at all is logged.

    Args:
        ax: the axes, limits and layout final.
        labels: one text per point.
        xy: the points, in data coordinates.
        colors: text colour per label (the marker's, so a label that moved away still reads as its point's).
        fontsize: label size in points.
        marker_sizes: scatter sizes (area in pt^2): the square inside each marker is kept free of labels.

    Returns:
        The annotation artists, in the order of ``labels``.
    """
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centres = [ax.transData.transform(p) for p in xy]
    # Half the side of the square inscribed in a marker of area s pt^2 is sqrt(s)/2/sqrt(2) points.
    halves = [max(_POINT_PX, math.sqrt(s) / 2 / math.sqrt(2) * fig.dpi / 72) for s in (marker_sizes or [0] * len(xy))]
    point_boxes = [Bbox.from_extents(cx - h, cy - h, cx + h, cy + h) for (cx, cy), h in zip(centres, halves)]
    placed: list[Any] = []
    texts = []
    for i, (label, p) in enumerate(zip(labels, xy)):
        obstacles = placed + point_boxes
        choice = None
        fallback = None
        for r in _RADII:
            for dx, dy in _DIRECTIONS:
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                off = (dx * r, dy * r)
                t = ax.annotate(label, p, xytext=off, textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                                color=colors[i] if colors is not None else "k")
                box = label_box(t, renderer).padded(_PAD_PX)
                clear = not any(_boxes_overlap(box, o) for o in obstacles)
                inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                t.remove()
                if clear and inside:
                    choice = (off, ha, va, r)
                    break
                if clear and fallback is None:
                    fallback = (off, ha, va, r)
            if choice:
                break
        if choice is None:
            choice = fallback or ((_RADII[0], _RADII[0]), "left", "bottom", _RADII[0])
            if fallback is None:
                logger.warning("no free place for the label %r: it overlaps another", label)
        off, ha, va, r = choice
        # A leader line ties a label that had to move away to its point.
        arrow = dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3) if r > _RADII[1] else None
        t = ax.annotate(label, p, xytext=off, textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                        color=colors[i] if colors is not None else "k", arrowprops=arrow)
        placed.append(label_box(t, renderer).padded(_PAD_PX))
        texts.append(t)
    return texts


def label_box(text: Any, renderer: Any = None) -> Any:
    """Display-coordinate box of a label's text alone (an annotation's own extent also covers its leader line)."""
    from matplotlib.text import Text

    renderer = renderer or text.figure.canvas.get_renderer()
    if hasattr(text, "update_positions"):  # an annotation computes where its text goes from its offset only here
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer)


def draw_pareto(records: Sequence[dict[str, Any]], title: str = "") -> tuple[Any, list[Any]]:
    """Draw the plot (see the module docstring); returns ``(figure, label artists)``. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and r.get("decode_tokens_per_s") and r.get("perplexity")]
    fig, ax = plt.subplots(figsize=(9, 6.2), dpi=110)
    texts: list[Any] = []
    caption = [training_caption(ok)]
    if ok:
        xs = [float(r["decode_tokens_per_s"]) for r in ok]
        ys = [float(r["perplexity"]) for r in ok]
        spreads = [decode_spread(r) for r in ok]
        kv = [r.get("kv_bytes") or 0 for r in ok]
        kmax = max(kv) or 1
        cmap = plt.get_cmap("tab10")
        colors = [cmap(i % 10) for i in range(len(ok))]
        sizes = [40 + 900 * k / kmax for k in kv]
        ax.scatter(xs, ys, s=sizes, alpha=0.45, c=colors, edgecolors="k", zorder=2)
        for x, y, s, c in zip(xs, ys, spreads, colors):
            if s is not None:
                ax.errorbar([x], [y], xerr=[[max(x - s[0], 0.0)], [max(s[1] - x, 0.0)]], fmt="none", ecolor=c,
                            elinewidth=1.2, capsize=3, zorder=3)
        front = pareto_front(list(zip(xs, ys)), spreads)
        if len(front) > 1:
            ax.plot([xs[i] for i in front], [ys[i] for i in front], "k--", lw=0.8, zorder=1,
                    label="Pareto front (steps only where speed IQRs do not overlap)")
            ax.legend(loc="upper left", fontsize=8)
        if max(ys) / max(min(ys), 1e-9) > 20:
            ax.set_yscale("log")
        # Room for labels at the edges: widen the limits a little before placing anything.
        lo, hi = min(s[0] if s else x for s, x in zip(spreads, xs)), max(s[1] if s else x for s, x in zip(spreads, xs))
        span = (hi - lo) or hi or 1.0
        ax.set_xlim(lo - 0.12 * span, hi + 0.3 * span)
        if ax.get_yscale() == "log":
            ax.set_ylim(min(ys) / 2.5, max(ys) * 4)
        else:
            ys_span = (max(ys) - min(ys)) or max(ys) or 1.0
            ax.set_ylim(min(ys) - 0.15 * ys_span, max(ys) + 0.3 * ys_span)
        r0 = ok[0]
        threads = (r0.get("env") or {}).get("threads")
        ax.set_xlabel(f"decode tokens/s (context {r0.get('decode_context')}, batch {r0.get('decode_batch')}"
                      + (f", {threads} thread(s)" if threads else "") + ") →")
        ax.set_ylabel("perplexity (token-level) ↓")
        steps = {c.get("n") for r in ok for c in r.get("decode") or [] if c.get("context") == r.get("decode_context")
                 and c.get("batch") == r.get("decode_batch")}
        n_tokens = (r0.get("ppl_detail") or {}).get("n_tokens")
        has_spread = any(s is not None for s in spreads)
        caption.append(
            (f"error bars: decode tokens/s interquartile range over {'/'.join(str(s) for s in sorted(steps) if s)} "
             f"timed steps; " if has_spread else "no speed spread recorded; ")
            + "perplexity is deterministic (one pass over the same " + (f"{n_tokens} " if n_tokens else "")
            + "tokens): no spread"
        )
        caption.append(f"marker area ∝ KV bytes @ {r0.get('kv_tokens')} tokens")
    ax.set_title((title or "perplexity vs decode speed") + "\n" + caption[0], fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.text(0.01, 0.005, "\n".join(caption[1:]), fontsize=7, color="0.3", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    if ok:
        texts = place_labels(ax, [r["variant"] for r in ok], list(zip(xs, ys)), colors, marker_sizes=sizes)
    return fig, texts


def plot_pareto(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Write the plot to ``path``; returns False (and logs) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", Path(path).name)
        return False
    import matplotlib.pyplot as plt

    fig, _ = draw_pareto(records, title)
    # No bbox_inches="tight": it would re-lay the figure out after the labels were placed on the final layout.
    fig.savefig(path)
    plt.close(fig)
    return True


def pareto_title(meta: dict[str, Any]) -> str:
    """The plot's first title line, from a comparison's ``run.json``."""
    return f"{(meta.get('config') or {}).get('model')}: perplexity vs decode speed"


def replot(folder: str | Path) -> Path:
    """Redraw ``folder/pareto.png`` from ``folder/results.json`` (and ``run.json`` for the title); nothing is rerun.

    Raises:
        ValueError: the folder has no ``results.json``.
    """
    folder = Path(folder)
    results = folder / "results.json"
    if not results.is_file():
        raise ValueError(f"{folder} has no results.json: pass a folder written by `hf-attn-swap eval`")
    records = json.loads(results.read_text())
    run = folder / "run.json"
    meta = json.loads(run.read_text()) if run.is_file() else {}
    png = folder / "pareto.png"
    if not plot_pareto(records, png, pareto_title(meta)):
        raise ValueError("matplotlib is not installed: pip install matplotlib")
    return png


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_attn_swap.eval.plot FOLDER``: redraw FOLDER/pareto.png from its results.json."""
    parser = argparse.ArgumentParser(prog="python -m hf_attn_swap.eval.plot", description=main.__doc__)
    parser.add_argument("folder", help="a comparison's output folder (results.json, run.json)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(f"{replot(args.folder)}\n")
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


__all__ = ["decode_spread", "draw_pareto", "label_box", "pareto_front", "pareto_title", "place_labels", "plot_pareto",
           "replot", "training_caption"]

if __name__ == "__main__":
    raise SystemExit(main())
