"""Saving and reloading swapped models: vanilla where possible, sidecar otherwise, atomic always."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import output, tiny

from hf_attn_swap import kv_heads_per_layer, swap_attention, swap_record
from hf_attn_swap.checkpoint import SIDECAR, SidecarMismatchError, load_swapped, read_sidecar, save_swapped

IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))

VANILLA_SCRIPT = """
import sys, torch
assert "hf_attn_swap" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
assert "hf_attn_swap" not in sys.modules, "vanilla reload imported hf_attn_swap"
print(model.config.num_key_value_heads)
"""


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_llama_family_reloads_in_vanilla_transformers_with_identical_logits(arch, tmp_path):
    model = tiny(arch)
    swap_attention(model, "gqa", groups=1, strategy="mean")
    with torch.no_grad():
        logits = model(IDS).logits
    save_swapped(model, tmp_path / "ckpt")
    assert read_sidecar(tmp_path / "ckpt")["vanilla"] is True
    torch.save(IDS, tmp_path / "ids.pt")
    script = tmp_path / "vanilla.py"
    script.write_text(VANILLA_SCRIPT)
    # A fresh interpreter that never imports hf_attn_swap.
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "1"
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits)  # same SDPA call, same weights: bit-identical


def test_gpt2_mqa_saves_as_vanilla_gpt_bigcode(tmp_path):
    from transformers import AutoModelForCausalLM, GPTBigCodeForCausalLM

    model = tiny("gpt2")
    swap_attention(model, "mqa", strategy="mean")
    ref = output(model, IDS)
    save_swapped(model, tmp_path / "ckpt")
    side = read_sidecar(tmp_path / "ckpt")
    assert side["vanilla"] is True and side["saved_model_type"] == "gpt_bigcode"
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(vanilla, GPTBigCodeForCausalLM) and vanilla.config.multi_query
    torch.testing.assert_close(output(vanilla, IDS), ref, atol=1e-5, rtol=1e-5)  # other kernel order, fp32
    loaded = load_swapped(tmp_path / "ckpt")
    torch.testing.assert_close(output(loaded, IDS), ref, atol=1e-5, rtol=1e-5)
    assert swap_record(loaded).steps[0].variant == "mqa"


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "bert", "llama"])
def test_sidecar_reload_restores_exactly(arch, tmp_path):
    model = tiny(arch)
    # llama: a conversion of only some layers has no vanilla form (num_key_value_heads is one number per model)
    layers = [0] if arch == "llama" else None
    swap_attention(model, "gqa", groups=2, strategy="mean", layers=layers)
    ref = output(model, IDS)
    save_swapped(model, tmp_path / "ckpt")
    assert read_sidecar(tmp_path / "ckpt")["vanilla"] is False
    loaded = load_swapped(tmp_path / "ckpt")
    assert kv_heads_per_layer(loaded) == kv_heads_per_layer(model)
    assert torch.equal(output(loaded, IDS), ref)
    assert swap_record(loaded).to_dict() == swap_record(model).to_dict()


def test_vanilla_directory_also_loads_through_load_swapped(tmp_path):
    model = tiny("llama")
    swap_attention(model, "gqa", groups=2, strategy="mean")
    save_swapped(model, tmp_path / "ckpt")
    loaded = load_swapped(tmp_path / "ckpt")
    assert loaded.config._attn_implementation == "gqa"
    assert torch.equal(output(loaded, IDS), output(model, IDS))
    assert swap_record(loaded).steps[0].lossy is True  # what the conversion knew survives the round trip


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sidecar_that_does_not_match_the_weights_is_refused(arch, tmp_path):
    model = tiny(arch)
    swap_attention(model, "gqa", groups=2, strategy="mean")
    save_swapped(model, tmp_path / "ckpt")
    side = tmp_path / "ckpt" / SIDECAR
    data = json.loads(side.read_text())
    data["record"]["steps"][0]["options"]["groups"] = 1  # claims MQA, weights hold 2 KV heads
    side.write_text(json.dumps(data))
    with pytest.raises(SidecarMismatchError, match="does not"):
        load_swapped(tmp_path / "ckpt")


def test_interrupted_save_leaves_the_previous_directory(tmp_path, monkeypatch):
    model = tiny("gpt2")
    swap_attention(model, "gqa", groups=2)
    target = tmp_path / "ckpt"
    save_swapped(model, target)
    before = sorted(p.name for p in target.iterdir())
    ref = output(load_swapped(target), IDS)

    other = tiny("gpt2", seed=1)
    swap_attention(other, "gqa", groups=4)
    real = type(other).save_pretrained

    def crash(self, path, *a, **k):
        real(self, path, *a, **k)  # weights written into the temp dir, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(type(other), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_swapped(other, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert torch.equal(output(load_swapped(target), IDS), ref)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no half-written directory left beside it


def test_plain_directory_without_sidecar_loads(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "plain")
    loaded = load_swapped(tmp_path / "plain")
    assert torch.equal(output(loaded, IDS), output(model, IDS))


@pytest.mark.parametrize("window", [0, 4], ids=["hedgehog", "hybrid"])
def test_hedgehog_round_trip_and_missing_state_is_refused(tmp_path, window):
    from safetensors.torch import load_file, save_file

    model = tiny("llama")
    swap_attention(model, "linear", feature_map="hedgehog", window=window)
    with torch.no_grad():  # pretend attention transfer trained the maps
        for name, p in model.named_parameters():
            if "feature_map" in name:
                p.add_(0.01 * torch.randn_like(p))
    ref = output(model, IDS)
    save_swapped(model, tmp_path / "ckpt")
    loaded = load_swapped(tmp_path / "ckpt")
    torch.testing.assert_close(output(loaded, IDS), ref, atol=0, rtol=0)
    if window:  # the learned mix travels with the maps
        assert any(k.endswith("log_gamma") for k in loaded.state_dict())
    f = tmp_path / "ckpt" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "feature_map" not in k}, str(f))
    with pytest.raises(ValueError, match="no trained hedgehog feature-map state"):
        load_swapped(tmp_path / "ckpt")
