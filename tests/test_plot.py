"""The comparison plot: spread as error bars, no Pareto step inside the noise, labels that never overlap, a title that
says what was trained, and a redraw from the committed results."""

from __future__ import annotations

import json
import random
import shutil
from itertools import combinations
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402

from hf_attn_swap.eval.plot import (  # noqa: E402
    draw_pareto,
    label_box,
    pareto_front,
    replot,
    training_caption,
)

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "eval_default"


def rec(variant: str, tps: float, ppl: float, q1: float | None = None, q3: float | None = None, kv: int = 1 << 20,
        **extra):
    cell = {"context": 1024, "batch": 4, "tokens_per_s": tps, "n": 12}
    if q1 is not None:
        cell.update(tokens_per_s_q1=q1, tokens_per_s_q3=q3)
    return {"variant": variant, "status": "ok", "decode_tokens_per_s": tps, "perplexity": ppl, "kv_bytes": kv,
            "decode_context": 1024, "decode_batch": 4, "kv_tokens": 1024, "decode": [cell], **extra}


def overlapping_labels(texts) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), label_box(t)) for t in texts]
    return [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2)
            if ba.x0 < bb.x1 and bb.x0 < ba.x1 and ba.y0 < bb.y1 and bb.y0 < ba.y1]


def test_a_speed_difference_within_the_spread_is_no_pareto_step():
    # flash: same perplexity, faster median but the IQRs overlap (the table's n.s.): a tie, the baseline stays alone.
    pts = [(23.5, 43.56), (25.1, 43.56)]
    assert pareto_front(pts, [(21.0, 26.0), (22.0, 27.0)]) == [0]
    assert pareto_front(pts) == [1]  # by medians alone flash would replace the baseline on the front
    # A faster variant with worse perplexity: a step only when its IQR clears the baseline's.
    pts = [(23.5, 43.56), (29.6, 65.6)]
    assert pareto_front(pts, [(21.0, 26.0), (27.3, 31.8)]) == [0, 1]
    assert pareto_front(pts, [(21.0, 26.0), (25.9, 31.8)]) == [0]


def test_front_steps_are_all_outside_the_spread_on_random_points():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        pts = [(rng.uniform(10, 40), rng.choice([40.0, 60.0, rng.uniform(30, 500)])) for _ in range(n)]
        spreads = [(x - rng.uniform(0, 4), x + rng.uniform(0, 4)) for x, _ in pts]
        front = pareto_front(pts, spreads)
        assert front, (pts, spreads)
        for i, j in combinations(front, 2):
            lo, hi = sorted((i, j), key=lambda k: pts[k][0])
            assert spreads[lo][1] < spreads[hi][0], "a step within the spread"
            assert pts[lo][1] < pts[hi][1], "slower point on the front must be better in perplexity"


def test_committed_results_front_has_no_step_the_table_calls_not_significant():
    records = [r for r in json.loads((COMMITTED / "results.json").read_text()) if r["status"] == "ok"]
    from hf_attn_swap.eval.plot import decode_spread

    front = pareto_front([(r["decode_tokens_per_s"], r["perplexity"]) for r in records],
                         [decode_spread(r) for r in records])
    names = [records[i]["variant"] for i in front]
    # every member but the baseline is significantly faster than the baseline, by the table's own flag, and the
    # slowest member of the front is the baseline or a variant that beats it on both axes
    assert all(records[i]["decode_significant"] is True for i in front if records[i]["variant"] != "baseline"), names
    base = next(r for r in records if r["variant"] == "baseline")
    first = records[front[0]]
    assert first is base or (first["decode_significant"] and first["perplexity"] <= base["perplexity"]), names
    # a variant the table calls not significant never makes the front
    assert not [r["variant"] for r in records if r["variant"] != "baseline" and r["decode_significant"] is False
                and r["variant"] in names]


def test_close_points_get_labels_that_do_not_overlap():
    # Nine points within 0.4 tok/s and 1 ppl of each other, long and short names, one huge marker, and one far point
    # that stretches the axes so the nine sit a few pixels apart: the old fixed offsets printed these over each other.
    records = [rec("baseline", 23.5, 43.56, 22.8, 24.1, kv=45 << 20)]
    records += [rec(f"variant_{i}:option={'x' * (i % 4)}", 23.5 + 0.05 * i, 43.56 + 0.3 * (i % 3), 23.0, 24.0)
                for i in range(1, 9)]
    records.append(rec("far", 35.0, 150.0, 34.0, 36.0, kv=5 << 20))
    fig, texts = draw_pareto(records, "synthetic")
    try:
        assert len(texts) == 10
        assert overlapping_labels(texts) == []
    finally:
        plt.close(fig)


def test_committed_results_plot_has_labels_apart_error_bars_and_says_nothing_was_trained():
    records = json.loads((COMMITTED / "results.json").read_text())
    fig, texts = draw_pareto(records, "smollm2-135m: perplexity vs decode speed")
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in texts] == [r["variant"] for r in records if r["status"] == "ok"]
        assert overlapping_labels(texts) == []
        frame = ax.get_window_extent()
        assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in map(label_box, texts))
        assert "all variants untrained" in ax.get_title()
        assert len(ax.containers) == len(texts)  # one x error bar (the IQR) per point
        caption = " ".join(t.get_text() for t in fig.texts)
        assert "interquartile range over 12 timed steps" in caption and "perplexity is deterministic" in caption
    finally:
        plt.close(fig)


def test_training_caption_names_what_was_trained():
    base = rec("baseline", 20, 40)
    assert training_caption([base, rec("mqa", 30, 120)]) == (
        "all variants untrained (converted from the baseline, no uptraining)")
    caption = training_caption([base, rec("mqa", 30, 50, trained=True), rec("linear", 31, 900)])
    assert caption == "trained: mqa; untrained (conversion only): linear"


def test_replot_redraws_from_json_only(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    for name in ("results.json", "run.json"):
        shutil.copy(COMMITTED / name, folder / name)
    png = replot(folder)
    assert png == folder / "pareto.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="has no results.json"):
        replot(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
