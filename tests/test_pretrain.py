"""The MHA decoder pre-trained here (hf_attn_swap.train.pretrain, recipes/pretrain_mha.py, zoo entry mha-llama-30m).

Every run here is a micro config (hidden 32, 2 layers, a few steps) with SmolLM2's real tokenizer and the real
corpora; checkpoints go to a temporary folder (``checkpoint_dir`` patched), never to the shared cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from hf_attn_swap import zoo
from hf_attn_swap.cliconfig import ConfigError
from hf_attn_swap.train import pretrain as pt
from hf_attn_swap.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
MICRO = dict(name="micro-test", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             max_position_embeddings=128, tokens=1024, block_size=64, batch_size=4, eval_tokens=128, eval_points=1,
             lr=3e-3, progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Checkpoints into tmp_path/models; corpora and the SmolLM2 tokenizer still come from the real cache (only the
    one function that places checkpoints is redirected, so nothing is ever fetched into tmp_path)."""
    monkeypatch.setattr(pt, "checkpoint_dir", lambda name: tmp_path / "models" / name)
    return tmp_path


def micro(**kw) -> PretrainConfig:
    return PretrainConfig(**{**MICRO, **kw})


def test_recipe_yaml_is_the_zoo_entry():
    """recipes/configs/pretrain_mha.yaml and the zoo's data describe the same run (they cannot drift apart)."""
    entry = zoo.MODELS["mha-llama-30m"]
    assert entry.format == "pretrain" and entry.kind == "causal_lm"
    from_yaml = PretrainConfig.load(ROOT / "recipes" / "configs" / "pretrain_mha.yaml")
    assert from_yaml.to_dict() == PretrainConfig.from_dict(entry.pretrain).to_dict()
    assert from_yaml.num_heads == 8 and from_yaml.train_tokens == 655_360


def test_config_refuses_bad_shapes_and_unknown_keys():
    with pytest.raises(ConfigError, match=r"num_heads=5 does not divide hidden_size=384; allowed: .*\b8\b"):
        PretrainConfig(num_heads=5)
    with pytest.raises(ConfigError, match="did you mean 'num_heads'"):
        PretrainConfig.from_dict({"num_head": 8})
    with pytest.raises(ConfigError, match="less than one batch"):
        PretrainConfig(tokens=100)


def test_vocab_and_small_corpus_refused_before_training(cache, tmp_path, monkeypatch):
    """One clear error before any step, and nothing written to the cache."""
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(pt, "train", no_training)
    with pytest.raises(ConfigError, match=r"vocab_size=60000 is larger than the tokenizer's.*49152 tokens"):
        pt.pretrain(micro(vocab_size=60000))
    with pytest.raises(ConfigError, match="smaller than the tokenizer's"):
        pt.pretrain(micro(vocab_size=1000))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be, that is the question.\n\n" * 3)
    with pytest.raises(ValueError, match=r"corpus '.*tiny.txt' is too small: its train split has \d+ tokens, fewer "
                                         r"than one batch \(batch_size\*block_size = 256\)"):
        pt.pretrain(micro(corpora=["shakespeare", str(tiny)]))
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_same_seed_same_weights_and_a_vanilla_checkpoint(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = pt.pretrain(micro(name="a"))
    b = pt.pretrain(micro(name="b"))
    c = pt.pretrain(micro(name="c", seed=1))
    sa, sb, sc = (AutoModelForCausalLM.from_pretrained(r.path).state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed: bit-identical
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # another seed: another model
    assert a.curve[-1].ppl == b.curve[-1].ppl

    model = AutoModelForCausalLM.from_pretrained(a.path)  # plain transformers, no sidecar
    assert model.config.num_key_value_heads == model.config.num_attention_heads == 4
    assert model.config.tie_word_embeddings and len(AutoTokenizer.from_pretrained(a.path)) == 49152
    saved = json.loads((Path(a.path) / pt.RESULT_FILE).read_text())
    assert set(saved["ppl"]) == {"shakespeare", "kjv", "sotu"} and saved["tokens"] == 1024 == a.steps * 256
    assert [p["step"] for p in saved["curve"]] == [0, 4]
    assert saved["curve"][0]["ppl_mean"] > saved["curve"][-1]["ppl_mean"]  # even 4 steps learn something
    n = saved["matmul_parameters"]
    assert saved["flops"] == 1024 * (6 * n + 6 * 2 * 64 * 32)
    assert n == saved["non_embedding_parameters"] + 49152 * 32
    assert saved["provenance"]["git"]["commit"] and saved["provenance"]["corpora"][0]["name"] == "shakespeare"
    assert saved["cpu_seconds"] > 0


def test_interrupted_run_leaves_nothing_that_counts_as_trained(cache, monkeypatch):
    """A failure while saving (after config.json is written) leaves no folder; with overwrite the old one survives."""
    real_save = pt.save

    def broken(model, tokenizer, result, folder):
        model.save_pretrained(folder)  # half a checkpoint: config.json and weights, no tokenizer or result
        raise OSError("disk full (injected)")

    monkeypatch.setattr(pt, "save", broken)
    with pytest.raises(OSError, match="injected"):
        pt.pretrain(micro())
    models = cache / "models"
    assert list(models.iterdir()) == []  # no folder, no temporary leftovers
    assert not pt.is_trained(models / "micro-test")

    monkeypatch.setattr(pt, "save", real_save)
    first = pt.pretrain(micro())
    before = {p.name: p.read_bytes() for p in Path(first.path).iterdir()}
    with pytest.raises(ValueError, match="already holds a model called 'micro-test'.*overwrite=true"):
        pt.pretrain(micro())
    monkeypatch.setattr(pt, "save", broken)
    with pytest.raises(OSError, match="injected"):
        pt.pretrain(micro(overwrite=True, seed=5))
    assert {p.name: p.read_bytes() for p in Path(first.path).iterdir()} == before
    assert [p.name for p in models.iterdir()] == ["micro-test"]


def test_zoo_trains_on_first_use_then_loads_from_cache(cache, monkeypatch, caplog):
    entry = zoo.ZooEntry(name="micro-zoo", hub_id="", pypi_name="", pypi_version="", file="", format="pretrain",
                         kind="causal_lm", description="test", pretrain={**MICRO, "name": "ignored"})
    monkeypatch.setitem(zoo.MODELS, "micro-zoo", entry)
    with caplog.at_level(logging.INFO, logger="hf_attn_swap"):
        model, tok = zoo.load_model("micro-zoo")
    text = caplog.text
    assert "micro-zoo is not in the cache yet: training it now" in text
    assert "pre-training micro-zoo from scratch" in text and "FLOPs" in text and "CPU-minutes" in text
    assert model.config.num_key_value_heads == 4 and tok is not None
    assert model.hf_attn_swap_source["registry"] == "trained"
    assert model.hf_attn_swap_source["weights_sha256"]

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(pt, "pretrain", no_training)
    again, _ = zoo.load_model("micro-zoo")  # cached: no training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pretrain_recipe_writes_its_report(cache, tmp_path, capsys):
    recipe = _recipe("pretrain_mha")
    out = tmp_path / "res" / "pre.json"
    assert recipe.main(["--config", str(ROOT / "recipes/configs/pretrain_micro.yaml"), "--results", str(out),
                        "tokens=1024", "eval_tokens=128", "eval_points=1", "progress=false"]) == 0
    data = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    assert f"{data['ppl']['kjv']:,.1f}" in md and f"{data['tokens']:,}" in md
    assert out.with_suffix(".png").stat().st_size > 1000
    capsys.readouterr()
    # unknown key and bad heads: one line, exit 2, nothing trained
    assert recipe.main(["--config", str(ROOT / "recipes/configs/pretrain_micro.yaml"), "num_heads=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_heads=3 does not divide hidden_size=32" in err


@pytest.mark.parametrize("recipe, flags", [("pretrain_mha.py", ["--num-heads", "--corpora", "--tokens"]),
                                           ("gqa_paper.py", ["--kv-heads", "--alphas", "--strategies"])])
def test_recipe_help_lists_the_config_without_importing_torch(recipe, flags):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "recipes" / recipe), "--help"],
                          capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "COLUMNS": "300", "PYTHONPATH": str(ROOT)})
    assert all(f + " " in proc.stdout for f in flags)
    assert not [line for line in proc.stderr.splitlines() if line.rstrip().endswith(("| torch", "| transformers"))]
