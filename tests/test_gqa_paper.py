"""recipes/gqa_paper.py: the GQA paper's experiments on the MHA decoder pre-trained here (micro config in CI)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from hf_attn_swap.cliconfig import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("gqa_paper", ROOT / "recipes" / "gqa_paper.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gqa_paper"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gp = _recipe()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The micro MHA model is trained into tmp_path/models, not the shared cache (corpora and tokenizer: the real
    cache)."""
    from hf_attn_swap.train import pretrain as pt

    monkeypatch.setattr(pt, "checkpoint_dir", lambda name: tmp_path / "models" / name)
    return tmp_path


def test_alpha_beyond_the_pretraining_run_refused_with_the_numbers(cache, monkeypatch):
    from hf_attn_swap.train import pretrain as pt

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(pt, "pretrain", no_training)
    cfg = gp.GqaPaperConfig(model=str(ROOT / "recipes/configs/pretrain_micro.yaml"), alphas=[0.0, 1.5],
                            reference_alpha=0.0)
    with pytest.raises(ConfigError, match=r"alpha=1.5 asks for 4,608 uptraining tokens, more than the 3,072 tokens "
                                          r".* was pre-trained on; allowed: alphas in \[0, 1\]"):
        gp.run(cfg)
    with pytest.raises(ConfigError, match="kv_heads=3 does not divide the model's 4 heads"):
        gp.run(gp.GqaPaperConfig(model=str(ROOT / "recipes/configs/pretrain_micro.yaml"), kv_heads=[3]))
    with pytest.raises(ConfigError, match="reference_alpha=0.05 is not one of alphas"):
        gp.GqaPaperConfig(alphas=[0.0, 0.1])
    from hf_attn_swap.cliconfig import from_dict

    with pytest.raises(ConfigError, match="did you mean 'kv_heads'"):
        from_dict(gp.GqaPaperConfig, {"kv_head": [1]})


def _synthetic(mean: float, first: float, random: float, times: dict[int, float]) -> dict:
    """A results JSON with chosen perplexities: MHA 10, converted per strategy, uptraining halves the log gap."""
    runs = []
    for k, scale in ((2, 1.0), (1, 1.5)):
        for s, conv in (("mean", mean), ("first", first), ("random", random)):
            for a in (0.0, 0.5):
                ppl = conv * scale if a == 0 else math.sqrt(conv * scale * 10)
                runs.append({"kv_heads": k, "strategy": s, "objective": "paper", "alpha": a, "ppl_mean": ppl})
    return {"config": {"kv_heads": [2, 1], "alphas": [0.0, 0.5], "strategies": ["mean", "first", "random"],
                       "objectives": ["paper"], "reference_alpha": 0.5},
            "mha": {"ppl_mean": 10.0}, "runs": runs,
            "decode": [{"kv_heads": k, "ms_per_sample": t} for k, t in times.items()]}


def test_findings_are_computed_from_the_numbers():
    """The same claims flip when the measured numbers do: nothing is typed in."""
    good = {f["claim"]: f["holds"] for f in gp.findings(_synthetic(20, 30, 40, {4: 3.0, 2: 2.0, 1: 1.0}))}
    bad = {f["claim"]: f["holds"] for f in gp.findings(_synthetic(40, 30, 20, {4: 1.0, 2: 2.0, 1: 3.0}))}
    order = "mean < first < random in perplexity, without uptraining"
    assert good[order] is True and bad[order] is False
    speed = "decode time orders MQA < GQA < MHA where the KV cache dominates"
    assert good[speed] is True and bad[speed] is False
    recovery = [c for c in good if c.startswith("uptraining with alpha=0.5 recovers")][0]
    assert good[recovery] is False  # half the log gap is 50% < 90%
    assert good["perplexity falls as alpha grows (paper objective, every strategy and KV count)"] is True
    # issue 12's goal: the best 2-KV-head run at the reference alpha within 5% of MHA (10.0)
    goal = "(this package) its best uptraining at alpha=0.5 brings 2 KV heads within 5% of MHA's perplexity"
    assert good[goal] is False  # best: sqrt(20 x 10) = 14.1, +41%
    close = {f["claim"]: f for f in gp.findings(_synthetic(10.2, 30, 40, {4: 3.0, 2: 2.0, 1: 1.0}))}[goal]
    assert close["holds"] is True and "mean + paper objective 10.1" in close["evidence"]  # sqrt(102) = 10.1, +1%


def test_strategies_measured_after_conversion_only():
    """A trimmed grid uptrains only uptrain_strategies: claims that need the others after uptraining say so (None),
    the rest are computed over what was uptrained."""
    with pytest.raises(ConfigError, match=r"uptrain_strategies names \['fit'\], which strategies does not convert"):
        gp.GqaPaperConfig(strategies=["mean", "first"], uptrain_strategies=["mean", "fit"])
    data = _synthetic(20, 30, 40, {4: 3.0, 2: 2.0, 1: 1.0})
    data["config"]["uptrain_strategies"] = ["mean"]
    data["runs"] = [r for r in data["runs"] if r["alpha"] == 0 or r["strategy"] == "mean"]
    got = {f["claim"]: f["holds"] for f in gp.findings(data)}
    assert got["mean < first < random in perplexity, without uptraining"] is True
    assert got["mean < first < random in perplexity, after uptraining with alpha=0.5 (paper)"] is None
    assert got["perplexity falls as alpha grows (paper objective, every strategy and KV count)"] is True


def test_micro_recipe_end_to_end(cache, tmp_path):
    out = tmp_path / "res" / "paper"
    assert gp.main(["--config", str(ROOT / "recipes/configs/gqa_paper_micro.yaml"), f"out={out}"]) == 0
    data = json.loads(out.with_name("paper.json").read_text())
    cfg = data["config"]
    assert len(data["runs"]) == 2 * 2 * 2 * 2  # kv x strategies x alphas x objectives
    assert {(r["kv_heads"], r["alpha"]) for r in data["runs"]} == {(2, 0.0), (2, 0.5), (1, 0.0), (1, 0.5)}
    up = [r for r in data["runs"] if r["alpha"] > 0]
    assert all(r["tokens"] >= data["budgets"]["0.5"] * 0.9 for r in up) and data["budgets"]["0.5"] == 1536
    assert all(set(r["ppl"]) == {"shakespeare", "kjv", "sotu"} and r["ppl_mean"] > 1 for r in data["runs"])
    assert [d["kv_heads"] for d in data["decode"]] == [4, 2, 1]
    assert data["decode"][0]["kv_bytes"] == 2 * data["decode"][1]["kv_bytes"] == 4 * data["decode"][2]["kv_bytes"]
    assert data["provenance"]["git"]["commit"] and cfg["reference_alpha"] == 0.5
    # the findings in the file are what findings() computes from the file's own numbers
    assert data["findings"] == gp.findings({k: v for k, v in data.items() if k != "findings"})
    assert {f["holds"] for f in data["findings"]} <= {True, False, None} and len(data["findings"]) >= 5
    md = out.with_name("paper.md").read_text()
    assert "| MHA | 4 |" in md and "| GQA-2 | 2 |" in md and "| MQA | 1 |" in md
    for f in data["findings"]:
        assert f["claim"] in md
    assert out.with_name("paper_alpha.png").stat().st_size > 1000 and out.with_name("paper_kv.png").is_file()
    # perturb the JSON: the recomputed finding follows the numbers
    flipped = copy.deepcopy(data)
    for r in flipped["runs"]:
        if r["alpha"] == 0:
            r["ppl_mean"] = {"mean": 3.0, "random": 1.0}[r["strategy"]]
    claim = "mean < random in perplexity, without uptraining"
    assert {f["claim"]: f["holds"] for f in gp.findings(flipped)}[claim] is False
    # --report re-derives the findings of a finished run from its JSON (nothing trained) and rewrites its reports
    stale = dict(data, findings=[{"claim": "typed in", "holds": True, "evidence": ""}])
    out.with_name("paper.json").write_text(json.dumps(stale))
    assert gp.main(["--report", str(out.with_name("paper.json"))]) == 0
    assert json.loads(out.with_name("paper.json").read_text())["findings"] == data["findings"]
    assert "typed in" not in out.with_name("paper.md").read_text()
    assert gp.main(["--report", str(tmp_path / "missing.json")]) == 2
