"""``uptrain`` end to end on a tiny random llama with SmolLM2's tokenizer and real text; CLI and recipe configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama
from plain_perplexity import plain_perplexity
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attn_swap.checkpoint import load_swapped
from hf_attn_swap.data import load_text, tokenize
from hf_attn_swap.train import UptrainConfig, uptrain

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random llama (2 layers, 4 heads, 2 KV heads) saved with SmolLM2's real tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def small(base: Path, out: Path, **kw) -> UptrainConfig:
    opts = dict(model=str(base), variant="mqa", variant_options={"strategy": "fit"}, conversion_tokens=256,
                corpus="shakespeare", eval_windows=2, eval_context=64, layerwise_tokens=512, layerwise_steps=5,
                layerwise_rows=2, block_size=64, tokens=1024, batch_size=4, lr=1e-3, save_steps=2, logging_steps=1,
                output_dir=str(out), progress=False)
    opts.update(kw)
    return UptrainConfig(**opts)


def test_uptrain_runs_measures_saves_and_reloads_identically(base, tmp_path):
    cfg = small(base, tmp_path / "run")
    r = uptrain(cfg)
    assert [c.stage for c in r.curve] == ["converted", "layerwise", "end_to_end"]
    assert r.ppl_uptrained == r.curve[-1].ppl
    # the original's held-out perplexity is the plain teacher's on the first 2 x 64 validation tokens, computed
    # independently; converting changes it, training moves it again
    tok = AutoTokenizer.from_pretrained(base)
    held = tokenize(tok, load_text("shakespeare", split="validation"), max_tokens=2 * 64)
    teacher = AutoModelForCausalLM.from_pretrained(base).eval()
    assert r.ppl_original == pytest.approx(plain_perplexity(teacher, held, 64), rel=1e-5)
    assert r.ppl_converted != pytest.approx(r.ppl_original, rel=1e-6)
    assert r.ppl_uptrained == pytest.approx(plain_perplexity(r.model.eval(), held, 64), rel=1e-5)
    assert r.provenance["models"][0]["weights_sha256"]["model.safetensors"] == \
        hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert r.tokens == 256 + 512 + 1024
    saved = json.loads((tmp_path / "run" / "uptrain_result.json").read_text())
    assert {"ppl_original", "ppl_converted", "ppl_uptrained", "tokens", "seconds", "curve", "provenance"} <= set(saved)
    assert saved["provenance"]["corpora"][0]["name"] == "shakespeare" and saved["provenance"]["git"]
    losses = [e["loss"] for e in r.train_log if "loss" in e]
    assert len(losses) == 1024 // (4 * 64)

    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        want = r.model(input_ids=ids).logits
        got = load_swapped(tmp_path / "run" / "final")(input_ids=ids).logits
        vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # no sidecar needed for MQA
        assert vanilla.config.num_key_value_heads == 1
        plain = vanilla(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fp32, same weights
    torch.testing.assert_close(plain, want, rtol=0, atol=1e-4)  # fp32, sdpa vs grouped kernel order

    # Resuming a finished run reloads stage 1 and the last checkpoint and trains nothing more.
    again = uptrain(cfg, resume=True)
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_lora_result_is_merged_and_reloads(base, tmp_path):
    r = uptrain(small(base, tmp_path / "lora", trainable="lora", layerwise_tokens=0, lm_weight=1.0, kl_weight=0.5,
                     eval_windows=0, conversion_tokens=0, variant_options={"strategy": "mean"}))
    assert not any("lora" in n for n, _ in r.model.named_parameters())
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_swapped(tmp_path / "lora" / "final")(input_ids=ids).logits,
                                   r.model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_too_short_text_is_an_error_and_writes_nothing(base, tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("Too short. " * 10)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="empty|too short|too small|fewer"):
        uptrain(small(base, out, corpus=str(text)))
    assert not out.exists()


def test_per_layer_stage_too_large_for_memory_is_refused_before_any_text_is_prepared(base, tmp_path, monkeypatch):
    """The check that saves a run from the OOM killer comes before the minutes of preparing text (teacher samples),
    with what it needs and what is free, and nothing is written."""
    from hf_attn_swap import preflight
    from hf_attn_swap.train import pipeline

    prepared = []
    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: prepared.append(1))
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 10 * 2**20)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"keep 0\.[0-9] GiB .*\(200000 tokens x 32 features x 2 layers, inputs and "
                                         r"outputs, float32\) but 0\.0 GiB is free on cpu"):
        uptrain(small(base, out, layerwise_tokens=200_000))
    assert not prepared and not out.exists()


def test_every_recipe_config_is_valid():
    configs = sorted((ROOT / "recipes" / "configs").glob("uptrain_*.yaml"))
    assert configs
    for path in configs:
        cfg = UptrainConfig.load(path)
        assert "recipes/uptrain.py" in path.read_text().splitlines()[0], f"{path.name}: first line = launch command"
        assert cfg.end_to_end or cfg.layerwise_tokens


def test_cli_prints_resolved_config(capsys):
    from hf_attn_swap.cli import main

    assert main(["uptrain", "--print-config", "tokens=2048", "lr=2e-4"]) == 0
    printed = capsys.readouterr().out
    assert "tokens: 2048" in printed and "lr: 0.0002" in printed
    assert main(["uptrain", "--print-config", "trainable=mlp"]) == 2  # clear one-line error


def test_recipe_results_json_has_provenance_and_a_checkable_md(base, tmp_path):
    """recipes/uptrain.py --results: the JSON records where it came from; the .md beside it is a generated block that
    python -m hf_attn_swap.readme --check holds to that JSON (a hand edit of a figure fails the check)."""
    import importlib.util

    from hf_attn_swap import readme

    spec = importlib.util.spec_from_file_location("uptrain_recipe", ROOT / "recipes" / "uptrain.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(small(base, tmp_path / "run", tokens=0, layerwise_steps=2).to_json())
    results = tmp_path / "res" / "r.json"
    assert recipe.main(["--config", str(cfg_path), "--results", str(results)]) == 0

    saved = json.loads(results.read_text())
    assert saved["provenance"]["models"][0]["path"] == str(base.resolve())
    md = results.with_suffix(".md")
    assert md.read_text().startswith("<!-- generated: r.json uptrain_table -->\n`python recipes/uptrain.py")
    assert readme.main(["--check", str(md), "--root", str(ROOT)]) == 0
    layerwise = next(c for c in saved["curve"] if c["stage"] == "layerwise")
    md.write_text(md.read_text().replace(f"| {layerwise['ppl']:.2f} |", "| 1.00 |"))
    assert readme.main(["--check", str(md), "--root", str(ROOT)]) == 1
