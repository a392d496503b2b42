"""Training mixes for uptraining (issue 15): disjoint per-corpus splits, held-out domains that never enter training,
teacher samples and recall sequences, per-domain evaluation, and the bad input refused before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama
from transformers import AutoTokenizer, LlamaForCausalLM

from hf_attn_swap import data as data_mod
from hf_attn_swap.cliconfig import ConfigError
from hf_attn_swap.data import _chunks, load_documents, load_text, tokenize
from hf_attn_swap.train import UptrainConfig, uptrain
from hf_attn_swap.train.mix import check_sources, recall_blocks, split_counts, teacher_samples
from hf_attn_swap.train.pipeline import prepare_data
from hf_attn_swap.zoo import resolve_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok) -> Path:
    """A tiny random llama (2 layers, 4 heads, 2 KV heads) saved with SmolLM2's real tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), max_positions=256)


def small(base: Path, out: Path, **kw) -> UptrainConfig:
    opts = dict(model=str(base), variant="mqa", variant_options={"strategy": "mean"}, conversion_tokens=0,
                mix={"shakespeare": 1, "kjv": 1, "recall": 1}, held_out=["sotu"], eval_windows=1, eval_context=64,
                layerwise_tokens=512, layerwise_steps=2, layerwise_rows=2, block_size=128, tokens=512, batch_size=2,
                lr=1e-3, save_steps=100, logging_steps=1, output_dir=str(out), progress=False)
    opts.update(kw)
    return UptrainConfig(**opts)


@pytest.mark.parametrize("name", ["shakespeare", "kjv", "sotu"])
def test_every_corpus_splits_disjoint_and_complete(name):
    chunks = [c for doc in load_documents(name) for c in _chunks(doc)]
    val = [c for c in chunks if data_mod._is_validation(c, 0.1)]
    train = [c for c in chunks if not data_mod._is_validation(c, 0.1)]
    assert load_text(name, "train") == "\n\n".join(train) and load_text(name, "validation") == "\n\n".join(val)
    assert not set(train) & set(val)  # identical chunks always land on the same side
    assert 0.05 < sum(map(len, val)) / sum(map(len, chunks)) < 0.2


def test_split_counts_follow_the_shares():
    assert split_counts(64 * 10, {"a": 1, "b": 1}, 64) == {"a": 5, "b": 5}
    c = split_counts(64 * 10, {"a": 3, "b": 1, "c": 1}, 64)
    assert sum(c.values()) == 10 and c["a"] == 6
    assert split_counts(0, {"a": 1}, 64) == {"a": 0}


def test_stage_data_disjoint_across_stages_and_held_out_only_read_for_validation(tok, monkeypatch):
    reads: list[tuple[str, str]] = []
    real = data_mod.load_text

    def spy(name, split="train", val_fraction=0.1):
        reads.append((str(name), split))
        return real(name, split, val_fraction)

    monkeypatch.setattr(data_mod, "load_text", spy)
    cfg = UptrainConfig(mix={"shakespeare": 2, "kjv": 1, "recall": 1}, held_out=["sotu"], eval_windows=1,
                        eval_context=64, conversion_tokens=256, layerwise_tokens=512, tokens=1024, block_size=128,
                        batch_size=2, layerwise_rows=2)
    prep = prepare_data(cfg, tok)
    assert ("sotu", "train") not in reads and ("sotu", "validation") in reads
    assert {n for n, s in reads if s == "train"} == {"shakespeare", "kjv"}
    assert prep.held_name == "sotu" and set(prep.domains) == {"shakespeare", "kjv", "sotu"}
    assert prep.calib.shape == (2, 128) and prep.layerwise.shape == (4, 128) and prep.end_to_end.shape == (8, 128)
    assert prep.mix_tokens["end_to_end"] == {"shakespeare": 512, "kjv": 256, "recall": 256}
    # the stages never share a block, and no training block appears in any evaluated validation text
    rows = [tuple(r.tolist()) for t in (prep.calib, prep.layerwise, prep.end_to_end) for r in t]
    assert len(set(rows)) == len(rows)
    held = {tuple(ids[i:i + 16].tolist()) for ids in prep.domains.values() for i in range(0, ids.numel() - 16, 8)}
    train_windows = {tuple(r[i:i + 16]) for r in rows for i in range(0, 112, 8)}
    assert not held & train_windows


def test_a_stage_does_not_depend_on_the_later_stages_budgets(tok, tmp_path):
    """The conversion's calibration (and the per-layer rows) stay the same when the end-to-end budget changes, recall
    rows included; and the recall rows' real text never repeats a plain-text training block."""
    from hf_attn_swap.train.mix import build_stage_data

    small_file = tmp_path / "small.txt"  # shorter than the fixed filler region: its filler follows its blocks
    small_file.write_text(load_text("austen", "train")[:30_000])
    mix = {"shakespeare": 1, "kjv": 1, str(small_file): 1, "recall": 1}
    runs = [build_stage_data(tok, None, mix, {"conversion": 512, "layerwise": 1024, "end_to_end": e}, 128, seed=3)
            for e in (512, 4096)]
    for stage in ("conversion", "layerwise"):
        assert torch.equal(runs[0].blocks[stage], runs[1].blocks[stage]), stage
    assert runs[1].blocks["end_to_end"].shape == (32, 128)
    # plain blocks are the corpora's first blocks; the other rows are the recall rows
    corpus_blocks = {tuple(b.tolist()) for name in mix if name != "recall"
                     for b in tokenize(tok, load_text(name, "train"), max_tokens=4096).view(-1, 128)}
    rows = [r for t in runs[1].blocks.values() for r in t]
    plain = [r for r in rows if tuple(r.tolist()) in corpus_blocks]
    recall_rows = [r for r in rows if tuple(r.tolist()) not in corpus_blocks]
    assert len(recall_rows) == sum(runs[1].tokens[s]["recall"] for s in runs[1].tokens) // 128 > 0
    windows = {tuple(r[i:i + 16].tolist()) for r in recall_rows for i in range(0, 113, 1)}
    assert not windows & {tuple(r[i:i + 16].tolist()) for r in plain for i in range(0, 113, 16)}


def test_recall_rows_hold_their_facts_and_end_on_an_answer(tok):
    filler = tokenize(tok, load_text("kjv", "train"), max_tokens=4000)
    rows = recall_blocks(tok, filler, 6, 128, seed=3)
    assert rows.shape == (6, 128)
    assert torch.equal(rows, recall_blocks(tok, filler, 6, 128, seed=3))
    assert not torch.equal(rows, recall_blocks(tok, filler, 6, 128, seed=4))
    for r in rows:
        text = tok.decode(r)
        last_line = text.rsplit("\n", 1)[-1]
        value = last_line.split()[-1]
        assert value.isdigit()
        # the asked value appeared earlier in the row, in one of the facts
        assert text[: len(text) - len(last_line)].count(value) >= 1
        assert "pass key" not in text.lower()  # the probe's wording is never trained on


def test_teacher_samples_are_deterministic_and_start_at_bos(base, tok):
    model = LlamaForCausalLM.from_pretrained(base).eval()
    a = teacher_samples(model, tok, 3, 12, seed=1, batch_size=2)
    assert a.shape == (3, 12) and bool((a[:, 0] == tok.bos_token_id).all())
    assert torch.equal(a, teacher_samples(model, tok, 3, 12, seed=1, batch_size=2))
    assert not torch.equal(a, teacher_samples(model, tok, 3, 12, seed=2, batch_size=2))


def test_uptrain_on_a_mix_reports_every_domain(base, tmp_path):
    r = uptrain(small(base, tmp_path / "run", mix={"shakespeare": 1, "teacher": 1, "recall": 1},
                      passkey_lengths=[128], passkey_trials=1))
    assert r.eval_domain == "sotu"
    assert set(r.domains) == {"shakespeare", "sotu"}
    assert r.domains["sotu"]["held_out"] and not r.domains["shakespeare"]["held_out"]
    assert r.ppl_original == r.domains["sotu"]["original"] and r.ppl_uptrained == r.domains["sotu"]["end_to_end"]
    for row in r.domains.values():
        assert {"original", "converted", "layerwise", "end_to_end", "recovery"} <= set(row)
    assert set(r.passkey) == {"original", "converted", "layerwise", "end_to_end"}
    assert all(0.0 <= v <= 1.0 for v in r.passkey.values())
    assert r.mix_tokens["end_to_end"] == {"shakespeare": 256, "teacher": 128, "recall": 128}
    assert 0 < r.train_cpu_seconds < r.cpu_seconds
    assert [c.stage for c in r.curve] == ["converted", "layerwise", "end_to_end"]


@pytest.mark.parametrize("kw,match", [
    (dict(mix={"shakespeare": 1, "sotu": 1}, held_out=["sotu"]), "both trained on and held out"),
    (dict(mix={}), "at least one source"),
    (dict(mix={"shakespeare": 0}), "positive number"),
    (dict(tokens=100), "less than one end-to-end step"),
    (dict(layerwise_tokens=128), "less than one per-layer step"),
    (dict(block_size=64, tokens=1024, layerwise_tokens=1024), "recall rows need block_size >= 128"),
])
def test_bad_mix_config_is_one_line(base, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        small(base, tmp_path / "x", **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kw,match", [
    (dict(mix={"shakespear": 1}), "unknown training source 'shakespear'.*allowed: .*shakespeare"),
    (dict(held_out=["nope"]), "unknown evaluation domain 'nope'"),
    (dict(held_out=["teacher"]), "generated text, not a domain"),
    (dict(mix={"recall": 1}, held_out=[]), "needs at least one corpus"),
])
def test_bad_sources_refused_before_anything_is_loaded_or_written(base, tmp_path, kw, match):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match) as err:
        uptrain(small(base, out, **kw))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_corpus_too_small_for_its_share_is_refused_before_training(base, tmp_path, tok):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("A short text. " * 40)  # a few hundred tokens: far less than its share
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"corpus '.*tiny.txt' is too small for its share of the mix: .* tokens") as e:
        uptrain(small(base, out, mix={"shakespeare": 1, str(tiny): 1}))
    assert "\n" not in str(e.value)
    assert not (out / "final").exists() and not (out / "stage1").exists()


def test_check_sources_accepts_paths_and_known_names(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("hello")
    check_sources({"shakespeare": 1, str(f): 2, "teacher": 1, "recall": 0.5}, ["sotu"], ["kjv"])


# ---- the across-domains report (recipes/uptrain_domains.py)

def _write_domains_config(tmp_path: Path, base: Path, goals: str = "") -> Path:
    cfg = small(base, tmp_path / "run", mix={"shakespeare": 1, "recall": 1})
    cfg_path = tmp_path / "mqa.yaml"
    cfg.save(cfg_path)
    spec = tmp_path / "domains.yaml"
    spec.write_text(f"runs:\n  - {{name: mqa, config: {cfg_path}, results: {tmp_path / 'res' / 'mqa.json'}}}\n{goals}")
    return spec


def test_uptrain_domains_report_checks_goals_from_the_figures(base, tmp_path, monkeypatch):
    import json

    from hf_attn_swap.readme import render
    from hf_attn_swap.train.domains import run_domains

    spec = _write_domains_config(tmp_path, base, "goals: {held_out_recovery: -100, passkey: 2}\n")
    report = run_domains(spec, tmp_path / "res" / "uptrain_domains", command="test")
    run = report["runs"]["mqa"]
    saved = json.loads((tmp_path / "res" / "mqa.json").read_text())
    assert run["held_out"] == ["sotu"] and run["held_out_recovery"] == saved["domains"]["sotu"]["recovery"]
    assert run["min_domain_recovery"] == min(r["recovery"] for r in saved["domains"].values())
    # goals are computed: an unreachable passkey goal is "not reached", a trivially low recovery goal "reached"
    assert run["goals"]["held_out_recovery"] is True and run["goals"]["passkey"] is None  # passkey not probed
    # the aggregate names the weights and text its runs used (this process loaded none of them)
    prov = report["provenance"]
    assert prov["models"] == saved["provenance"]["models"] and prov["models"][0].get("weights_sha256")
    assert prov["corpora"] == saved["provenance"]["corpora"] and prov["dtype"] == saved["provenance"]["dtype"]
    assert (tmp_path / "res" / "uptrain_domains.png").stat().st_size > 10_000
    md = (tmp_path / "res" / "uptrain_domains.md").read_text()
    assert "| sotu | **yes** |" in md and render(md, tmp_path / "res", tmp_path) == md  # equal to its JSON
    # the cross-run table: final held-out perplexity beside the original's, from the run's own domain table
    sotu = saved["domains"]["sotu"]
    assert f"| mqa | mqa:strategy=mean | {sotu[saved['curve'][-1]['stage']]:.1f} ({sotu['original']:.1f}) |" in md
    # --reuse takes the run's JSON as it is (same config): nothing is trained again
    before = (tmp_path / "res" / "mqa.json").stat().st_mtime_ns
    again = run_domains(spec, tmp_path / "res" / "uptrain_domains", command="test", reuse=True)
    assert (tmp_path / "res" / "mqa.json").stat().st_mtime_ns == before
    assert again["runs"]["mqa"]["held_out_recovery"] == run["held_out_recovery"]
    assert again["provenance"]["models"] == saved["provenance"]["models"]
    # --reuse never trains: a run without results is left out of the report, not started
    from hf_attn_swap.train import domains as domains_mod

    spec.write_text(spec.read_text().replace("goals:", "  - {name: other, config: %s, results: %s}\ngoals:" % (
        tmp_path / "mqa.yaml", tmp_path / "res" / "other.json")))
    monkeypatch.setattr("hf_attn_swap.train.pipeline.uptrain", lambda *a, **k: pytest.fail("--reuse trained a run"))
    third = domains_mod.run_domains(spec, tmp_path / "res" / "uptrain_domains", command="test", reuse=True)
    assert list(third["runs"]) == ["mqa"] and not (tmp_path / "res" / "other.json").exists()


@pytest.mark.parametrize("text,match", [
    ("runs: []\n", "non-empty list"),
    ("runs:\n  - {name: a, config: nowhere.yaml, results: r.json}\n", "no uptrain config at nowhere.yaml"),
    ("runs:\n  - {name: a, config: CFG, results: r.json}\ngoals: {speed: 2}\n", r"unknown goal\(s\) \['speed'\]"),
    ("runs:\n  - {name: a, config: CFG}\n", "exactly {name, config, results}"),
    ("walks: 1\n", "allowed: runs, goals"),
])
def test_bad_domains_config_is_one_line(tmp_path, text, match):
    from hf_attn_swap.train.domains import DomainsError, run_domains

    cfg = tmp_path / "c.yaml"
    UptrainConfig().save(cfg)
    spec = tmp_path / "d.yaml"
    spec.write_text(text.replace("CFG", str(cfg)))
    with pytest.raises(DomainsError, match=match) as err:
        run_domains(spec, tmp_path / "out", command="test")
    assert "\n" not in str(err.value) and not (tmp_path / "out.json").exists()


def test_rewriting_a_run_keeps_the_notes_written_under_its_generated_block(tmp_path):
    from hf_attn_swap.train.domains import write_run_results

    result = {"ppl_original": 10.0, "ppl_converted": 20.0, "ppl_uptrained": 12.0, "recovery": 0.74, "tokens": 1,
              "seconds": 1.0, "curve": [{"stage": "end_to_end", "ppl": 12.0, "tokens": 1, "seconds": 1.0}]}
    path = write_run_results(result, tmp_path / "r.json", "cmd")
    md = path.with_suffix(".md")
    md.write_text(md.read_text() + "\nNotes by hand.\n")
    write_run_results({**result, "ppl_uptrained": 11.0}, path, "cmd")
    text = md.read_text()
    assert text.endswith("\nNotes by hand.\n") and "| end_to_end | 12.00 |" in text and text.count("generated:") == 1


def test_results_record_the_code_as_it_was_when_the_run_started(base, tmp_path, monkeypatch):
    """A long run may write results into its own checkout before it ends: the commit recorded is the start's."""
    import hf_attn_swap.provenance as prov

    calls = []

    def fake_git_state(path=None):
        calls.append(path)
        return {"commit": f"state{len(calls)}", "dirty": len(calls) > 1}

    monkeypatch.setattr(prov, "git_state", fake_git_state)
    r = uptrain(small(base, tmp_path / "run", layerwise_tokens=0, eval_windows=0))
    assert len(calls) >= 2 and r.provenance["git"] == {"commit": "state1", "dirty": False}


def test_a_saved_config_older_than_an_option_matches_with_that_options_default():
    """Runs saved before mixed_precision existed ran in float32: they are still the runs of their unchanged YAML, and
    a config that asks for bf16 is another run."""
    from hf_attn_swap.train import UptrainConfig
    from hf_attn_swap.train.domains import same_config

    current = UptrainConfig(tokens=4096).to_dict()
    saved = {k: v for k, v in current.items() if k != "mixed_precision"}
    assert same_config(saved, current)
    assert not same_config(saved, {**current, "mixed_precision": "bf16"})
    assert not same_config({**saved, "lr": 1.0}, current)
