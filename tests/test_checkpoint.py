"""Saving and reloading swapped models: vanilla where possible, sidecar otherwise, atomic always."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

import pytest
import torch
from tiny_models import output, tiny

from hf_attn_swap import kv_heads_per_layer, swap_attention, swap_record
from hf_attn_swap import checkpoint
from hf_attn_swap.checkpoint import (
    CONFIG_MARK,
    SIDECAR,
    CheckpointIntegrityError,
    SidecarMismatchError,
    load_swapped,
    read_sidecar,
    save_swapped,
)
from hf_attn_swap.outputs import OutputDirError

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


def _reseal(ckpt):
    """Record the files' current hashes in the sidecar, as a deliberate editor might: what is then left to catch a
    mismatch is the structural checks."""
    side = ckpt / SIDECAR
    data = json.loads(side.read_text())
    data["sha256"] = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in data["sha256"]}
    data["sidecar_sha256"] = checkpoint._content_digest(data)
    side.write_text(json.dumps(data))


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
    _reseal(tmp_path / "ckpt")  # the hash then passes and the shape check must catch it
    with pytest.raises(SidecarMismatchError, match="does not") as err:
        load_swapped(tmp_path / "ckpt")
    assert not isinstance(err.value, CheckpointIntegrityError)  # the shape check, not the hash, refused it


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
        save_swapped(other, target, overwrite=True)
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
    _reseal(tmp_path / "ckpt")  # past the hash check, so the feature-map check itself is what refuses it
    with pytest.raises(ValueError, match="no trained hedgehog feature-map state"):
        load_swapped(tmp_path / "ckpt")


# --- integrity: hashes recorded on save, verified on load; every failure injected -----------------------------------


def _saved(tmp_path, arch="llama", variant="gqa", **opts):
    model = tiny(arch)
    swap_attention(model, variant, **(opts or {"groups": 2, "strategy": "mean"}))
    return model, save_swapped(model, tmp_path / "ckpt")


def test_sidecar_records_the_hashes_of_config_weights_and_itself(tmp_path):
    _, ckpt = _saved(tmp_path)
    side = read_sidecar(ckpt)
    assert side["format_version"] == 2
    assert set(side["sha256"]) == {"config.json", "model.safetensors"}
    for name, digest in side["sha256"].items():
        assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in ckpt.iterdir() if p.name != SIDECAR) == side["files"]
    # Reformatting the sidecar changes no content: still verified and loadable.
    (ckpt / SIDECAR).write_text(json.dumps(json.loads((ckpt / SIDECAR).read_text()), indent=8))
    load_swapped(ckpt)


@pytest.mark.parametrize("cut", ["half", "empty"])
def test_truncated_sidecar_is_an_error_naming_the_file_and_the_json_problem(tmp_path, cut):
    _, ckpt = _saved(tmp_path)
    side = ckpt / SIDECAR
    text = side.read_text()
    side.write_text(text[: len(text) // 2] if cut == "half" else "")
    with pytest.raises(CheckpointIntegrityError,
                       match=rf"{side} is not valid JSON \(.* at line \d+ column \d+\): it is truncated or damaged"):
        load_swapped(ckpt)


def test_sidecar_with_an_edited_window_is_refused(tmp_path):
    """Before hashes, this loaded silently with the wrong window."""
    model, ckpt = _saved(tmp_path, "llama", "sliding_window", window=4)
    side = ckpt / SIDECAR
    data = json.loads(side.read_text())
    data["record"]["steps"][0]["options"]["window"] = 8
    side.write_text(json.dumps(data, indent=2))
    with pytest.raises(CheckpointIntegrityError, match=rf"{side} was changed after saving: the sha256 of its content "
                       r"is [0-9a-f]{16}\.\.\., the recorded sidecar_sha256 is [0-9a-f]{16}"):
        load_swapped(ckpt)


def test_edited_or_replaced_weights_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    _, ckpt = _saved(tmp_path)
    weights = ckpt / "model.safetensors"
    recorded = read_sidecar(ckpt)["sha256"]["model.safetensors"]
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3  # a valid file with the same tensors and shapes, other values
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointIntegrityError, match=rf"{weights} is not the file that was saved: sha256 "
                       rf"[0-9a-f]{{16}}\.\.\. found, {recorded[:16]}\.\.\. recorded in {SIDECAR}"):
        load_swapped(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointIntegrityError, match=rf"{weights} is missing"):
        load_swapped(ckpt)


def test_edited_config_is_refused(tmp_path):
    _, ckpt = _saved(tmp_path)
    cfg = ckpt / "config.json"
    data = json.loads(cfg.read_text())
    data["rope_theta"] = 1234.0
    cfg.write_text(json.dumps(data))
    with pytest.raises(CheckpointIntegrityError, match=rf"{cfg} is not the file that was saved"):
        load_swapped(ckpt)


def test_a_checkpoint_that_needs_its_sidecar_refuses_to_load_plain_without_it(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    model, ckpt = _saved(tmp_path, "llama", "linear", feature_map="elu")
    ref = output(model, IDS)
    assert read_sidecar(ckpt)["vanilla"] is False
    mark = json.loads((ckpt / "config.json").read_text())[CONFIG_MARK]
    assert mark["needs_sidecar"] is True and mark["variants"] == ["linear"] and "load_swapped" in mark["note"]
    # The mark keeps the folder loadable by transformers itself (with the original attention, as the note says).
    AutoModelForCausalLM.from_pretrained(ckpt)
    loaded = load_swapped(ckpt)
    assert not hasattr(loaded.config, CONFIG_MARK)  # describes the folder, not the model: not carried into a re-save
    (ckpt / SIDECAR).unlink()
    with pytest.raises(CheckpointIntegrityError, match=rf"{ckpt / SIDECAR} is missing: .*\(linear\) that config.json "
                       "cannot describe; restore the sidecar, or pass allow_plain=True"):
        load_swapped(ckpt)
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        plain = load_swapped(ckpt, allow_plain=True)
    assert any("original attention" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not torch.allclose(output(plain, IDS), ref)  # really the original attention: why the default refuses


def test_vanilla_checkpoints_carry_no_mark_and_load_plain_without_sidecar(tmp_path):
    model, ckpt = _saved(tmp_path, "llama", "gqa", groups=2, strategy="mean")
    assert CONFIG_MARK not in json.loads((ckpt / "config.json").read_text())
    (ckpt / SIDECAR).unlink()
    assert torch.equal(output(load_swapped(ckpt), IDS), output(model, IDS))


def test_format_1_sidecar_still_loads_with_a_warning(tmp_path, caplog):
    model, ckpt = _saved(tmp_path, "gpt2")
    side = ckpt / SIDECAR
    data = json.loads(side.read_text())
    for key in ("files", "sha256", "sidecar_sha256"):
        del data[key]
    data["format_version"] = 1
    side.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        loaded = load_swapped(ckpt)
    assert torch.equal(output(loaded, IDS), output(model, IDS))
    assert any("records no hashes" in r.getMessage() and "cannot be verified" in r.getMessage()
               for r in caplog.records)


# --- the target folder: checked before anything is written; nothing we did not write is deleted -------------------


def test_save_refuses_a_folder_with_a_users_file_and_leaves_it(tmp_path):
    model = tiny("llama")
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match=rf"{target} is not a checkpoint \(thesis.tex\); saving replaces the "
                           "whole folder and would delete them, even with overwrite"):
            save_swapped(model, target, overwrite=overwrite)
    assert [p.name for p in target.iterdir()] == ["thesis.tex"]
    assert (target / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left beside it


def test_overwrite_replaces_our_checkpoint_but_not_a_file_added_to_it(tmp_path):
    first, ckpt = _saved(tmp_path, "gpt2")
    second = tiny("gpt2", seed=1)
    swap_attention(second, "gqa", groups=4)
    with pytest.raises(OutputDirError, match="already holds a checkpoint .*pass --overwrite"):
        save_swapped(second, ckpt)
    assert torch.equal(output(load_swapped(ckpt), IDS), output(first, IDS))
    save_swapped(second, ckpt, overwrite=True)
    assert torch.equal(output(load_swapped(ckpt), IDS), output(second, IDS))
    (ckpt / "notes.md").write_text("mine")
    with pytest.raises(OutputDirError, match=r"holds files a checkpoint did not write \(notes.md\)"):
        save_swapped(first, ckpt, overwrite=True)
    assert (ckpt / "notes.md").read_text() == "mine"
    assert torch.equal(output(load_swapped(ckpt), IDS), output(second, IDS))


def test_overwrite_replaces_a_plain_transformers_checkpoint(tmp_path):
    plain = tiny("llama")
    plain.save_pretrained(tmp_path / "ckpt")
    model = tiny("llama", seed=1)
    swap_attention(model, "gqa", groups=2, strategy="mean")
    save_swapped(model, tmp_path / "ckpt", overwrite=True)
    assert torch.equal(output(load_swapped(tmp_path / "ckpt"), IDS), output(model, IDS))


def test_zoo_load_model_replays_a_saved_swap_and_refuses_a_missing_sidecar(tmp_path):
    """``--model DIR`` (eval, convert, uptrain) on a folder save_swapped wrote: the saved attention runs, not the
    original one a plain ``from_pretrained`` would silently give; a checkpoint that needs its sidecar and lost it is
    refused, naming the file."""
    from hf_attn_swap import zoo
    from hf_attn_swap.api import swap_record
    from hf_attn_swap.checkpoint import CheckpointIntegrityError

    model = tiny("llama")
    swap_attention(model, "linear", feature_map="elu")  # attention-only: config.json cannot say it
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    save_swapped(model, tmp_path / "ckpt")
    loaded, tok = zoo.load_model(tmp_path / "ckpt")
    assert tok is None  # no tokenizer files were saved
    assert [s.variant for s in swap_record(loaded).steps] == ["linear"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    (tmp_path / "ckpt" / "hf_attn_swap.json").unlink()
    with pytest.raises(CheckpointIntegrityError, match="hf_attn_swap.json is missing"):
        zoo.load_model(tmp_path / "ckpt")
