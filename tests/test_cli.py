"""The command line: `variants` and `convert` end to end on a small llama with SmolLM2's real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from plain_perplexity import plain_perplexity
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attn_swap.checkpoint import load_swapped, read_sidecar
from hf_attn_swap.cli import main
from hf_attn_swap.data import load_text, tokenize


def test_variants_lists_every_variant_with_options(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    for name in ("gqa", "mqa", "sliding_window", "linear", "flash", "sparse"):
        assert name in out
    assert "groups (int, default 1)" in out
    assert 'strategy (str, default "mean"; one of: mean, first, random, fit, align, refit)' in out


@pytest.fixture()
def small_llama_dir(tmp_path, smollm2):
    _, tok = smollm2
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=512)
    path = tmp_path / "small"
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def keep_threads():
    """The CLI sets torch's thread count for its process; give the test process its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_convert_reports_perplexity_and_saves(small_llama_dir, tmp_path, capsys, caplog, keep_threads):
    out = tmp_path / "converted"
    torch.set_num_threads(2)
    with caplog.at_level("INFO", logger="hf_attn_swap.cli"):
        code = main(["convert", "--model", str(small_llama_dir), "--variant", "gqa:groups=2,strategy=fit",
                     "--calib-tokens", "1024", "--eval-tokens", "128", "--context", "64", "--out", str(out)])
    assert code == 0
    # 1 thread unless --threads says otherwise, stated once
    assert torch.get_num_threads() == 1
    assert [r.getMessage() for r in caplog.records if "torch thread" in r.getMessage()] == [
        "using 1 torch thread(s); --threads to change"]
    text = capsys.readouterr().out
    report = json.loads(text[text.index("\n{\n") + 1 :])  # the JSON summary ends the output
    # both figures equal an independent computation on the same held-out ids (before: the saved model; after: the
    # converted one as reloaded), up to float32 summation order and the 3 decimals the report keeps
    tok = AutoTokenizer.from_pretrained(small_llama_dir)
    ids = tokenize(tok, load_text("shakespeare", split="validation"), max_tokens=128)
    before = AutoModelForCausalLM.from_pretrained(small_llama_dir).eval()
    assert report["ppl_before"] == pytest.approx(plain_perplexity(before, ids, 64), rel=1e-5)
    assert report["ppl_after"] == pytest.approx(plain_perplexity(load_swapped(out).eval(), ids, 64), rel=1e-5)
    assert report["ppl_after"] != report["ppl_before"]
    assert report["steps"][0]["layers"] == "0-1" and report["steps"][0]["calibration_tokens"] == 1024
    assert read_sidecar(out)["vanilla"] is True
    assert load_swapped(out).config.num_key_value_heads == 2


def test_convert_bad_variant_is_one_clear_line(small_llama_dir, capsys, keep_threads):
    assert main(["convert", "--model", str(small_llama_dir), "--variant", "gqa:groups=3", "--eval-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: groups=3 must divide" in err and "Traceback" not in err


def test_convert_unknown_variant_or_option_fails_before_loading(monkeypatch, tmp_path, capsys, keep_threads):
    import hf_attn_swap.zoo as zoo

    def no_loading(*a, **k):
        raise AssertionError("the model loader must not run")

    monkeypatch.setattr(zoo, "load_model", no_loading)
    assert main(["convert", "--variant", "gqa:grups=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown option(s) 'grups' for variant 'gqa'" in err
    assert main(["convert", "--variant", "nonsense"]) == 2
    assert "unknown attention variant 'nonsense'; known variants: flash, gqa" in capsys.readouterr().err
    assert main(["convert", "--calib-tokens", "many"]) == 2
    assert "calib_tokens must be int, got 'many'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_threads_flag_overrides_the_default(small_llama_dir, capsys, keep_threads):
    assert main(["convert", "--model", str(small_llama_dir), "--variant", "gqa:groups=2", "--eval-tokens", "0",
                 "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
