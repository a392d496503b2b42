"""Device and dtype of ``eval`` and ``uptrain``: everything runs where and in what precision it was asked, the reports
say so, and impossible choices are one clear line before anything loads or is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_attn_swap import devices
from hf_attn_swap.devices import resolve, resolve_dtype

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_float16_matmul(monkeypatch):
    """A CPU whose torch has no float16 matmul (as CPU builds before torch 2.1 had), injected at torch.matmul."""
    real = torch.matmul

    def matmul(a, b, *args, **kw):
        if a.dtype == torch.float16 and a.device.type == "cpu":
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(a, b, *args, **kw)

    devices._probe.cache_clear()
    monkeypatch.setattr(torch, "matmul", matmul)
    yield
    devices._probe.cache_clear()


# ------------------------------------------------------------------ the checks themselves


def test_dtype_names_and_aliases():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match=r"^unknown dtype 'float8'; allowed: float32, bfloat16, float16, fp32 "):
        resolve_dtype("float8")


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(monkeypatch):
    from hf_attn_swap.devices import auto_device, resolve_device

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    # a machine with 4 GPUs: rank 2 of an accelerate/torchrun launch takes cuda:2; accelerate's --cpu keeps the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert auto_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("AUTO") == torch.device("cuda", 2)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert auto_device() == torch.device("cpu")


def test_every_entry_point_defaults_to_auto():
    from hf_attn_swap.commands.convert import ConvertConfig
    from hf_attn_swap.eval.config import EvalConfig
    from hf_attn_swap.train.config import UptrainConfig

    assert ConvertConfig.__dataclass_fields__["device"].default == "auto"
    assert EvalConfig().device == "auto" and UptrainConfig().device == "auto"


def test_cpu_runs_every_dtype_here():
    for name in devices.DTYPES:
        assert resolve("cpu", name) == (torch.device("cpu"), devices.DTYPES[name])


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_what_is_available(name):
    with pytest.raises(ValueError, match=rf"^device='{name}' needs CUDA, but .*; available here: cpu"):
        resolve(name, "float32")


def test_unknown_device_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown device 'gpu0'; allowed: auto, .*\(available here: cpu") as err:
        resolve("gpu0", "float32")
    assert "\n" not in str(err.value)


def test_dtype_the_device_cannot_run_lists_those_it_can(no_float16_matmul):
    with pytest.raises(ValueError) as err:
        resolve("cpu", "float16")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("dtype=float16 cannot run on cpu here (RuntimeError: \"addmm_impl_cpu_\" not implemented")
    assert msg.endswith("allowed here: float32, bfloat16")


@NEEDS_CUDA
def test_cuda_bfloat16_resolves():  # pragma: no cover - GPU only
    dev, dt = resolve("cuda", "bfloat16")
    assert dev.type == "cuda" and dt is torch.bfloat16


# ------------------------------------------------------------------ eval

from test_eval_recipe import _small, tiny_dir  # noqa: E402,F401  (the recipe tests' tiny model and corpus)


def _eval_cfg(tiny_dir, out, **extra):
    from hf_attn_swap.eval.compare import load_config

    return load_config(None, _small(tiny_dir, out, "baseline,mqa:strategy=fit,sliding_window:window=16",
                                    **{"passkey.enabled": "false", "plot": "false", **extra}))


def test_eval_runs_in_bfloat16_and_says_so(tiny_dir, tmp_path, monkeypatch):
    import importlib

    ppl_mod = importlib.import_module("hf_attn_swap.eval.perplexity")  # the package re-exports a function by that name
    from hf_attn_swap.eval.compare import run_comparison

    seen = []
    real = ppl_mod.perplexity

    def spy(model, ids, **kw):
        seen.append((next(model.parameters()).dtype, next(model.parameters()).device.type))
        return real(model, ids, **kw)

    monkeypatch.setattr(ppl_mod, "perplexity", spy)
    out = tmp_path / "bf16"
    records = run_comparison(_eval_cfg(tiny_dir, out, device="cpu", dtype="bfloat16"))
    assert [r["status"] for r in records] == ["ok"] * 3, [r.get("reason") for r in records]
    assert seen == [(torch.bfloat16, "cpu")] * 3  # baseline and both variants (fit calibrated in bfloat16 too)
    assert {r["env"]["dtype"] for r in records} == {"bfloat16"}
    run = json.loads((out / "run.json").read_text())
    assert run["run_on"] == {"device": "cpu", "dtype": "bfloat16", "eval_threads": 1, "speed_threads": 1}
    assert "Ran on: cpu, bfloat16" in (out / "results.md").read_text().split("## ")[0]


@NO_CUDA
def test_eval_cuda_without_cuda_fails_before_loading(tiny_dir, tmp_path, monkeypatch):
    from hf_attn_swap import zoo
    from hf_attn_swap.eval.compare import run_comparison

    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"^device='cuda' needs CUDA.*available here: cpu$"):
        run_comparison(_eval_cfg(tiny_dir, out, device="cuda"))
    assert not out.exists()


def test_eval_dtype_the_cpu_cannot_run_fails_before_loading(tiny_dir, tmp_path, monkeypatch, no_float16_matmul):
    from hf_attn_swap import zoo
    from hf_attn_swap.eval.compare import run_comparison

    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"^dtype=float16 cannot run on cpu here .*allowed here: float32, bfloat16$"):
        run_comparison(_eval_cfg(tiny_dir, out, dtype="float16"))
    assert not out.exists()


def test_eval_refuses_a_passed_model_elsewhere_and_leaves_it(tiny_dir, tmp_path):
    from hf_attn_swap.eval.compare import run_comparison
    from hf_attn_swap.zoo import load_model

    model, tok = load_model(str(tiny_dir / "model"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the model passed is on cpu in float32, the config asks for cpu in bfloat16"):
        run_comparison(_eval_cfg(tiny_dir, tmp_path / "x", dtype="bfloat16"), model=model, tokenizer=tok)
    assert not (tmp_path / "x").exists()
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


# ------------------------------------------------------------------ uptrain


def test_uptrain_config_checks_dtype_names():
    from hf_attn_swap.train import UptrainConfig

    assert UptrainConfig(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"^unknown dtype 'float64'; allowed: float32, bfloat16"):
        UptrainConfig(dtype="float64")
    with pytest.raises(ValueError, match=r"^dtype=float16 cannot train here: .*allowed: float32, bfloat16$"):
        UptrainConfig(dtype="float16")


@NO_CUDA
def test_uptrain_cuda_without_cuda_fails_before_anything(tmp_path, monkeypatch):
    from hf_attn_swap import zoo
    from hf_attn_swap.train import UptrainConfig, uptrain

    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"^device='cuda:1' needs CUDA.*available here: cpu$"):
        uptrain(UptrainConfig(device="cuda:1", output_dir=str(out)))
    assert not out.exists()


def test_uptrain_in_bfloat16_keeps_student_and_teacher_there(tmp_path, monkeypatch):
    """Conversion (fit calibration), the per-layer stage and the end-to-end stage on a bfloat16 student against a
    bfloat16 teacher: every forward the Trainer's loss and the layerwise stage make is in bfloat16, and the saved
    model is bfloat16."""
    from test_train_pipeline import small

    from hf_attn_swap.train import trainer as trainer_mod
    from hf_attn_swap.train import uptrain

    base = _tiny_base(tmp_path)
    seen = []
    real = trainer_mod.UptrainTrainer.compute_loss

    def spy(self, model, inputs, *a, **kw):
        seen.append((next(model.parameters()).dtype, next(self.teacher.parameters()).dtype, inputs["input_ids"].device.type))
        return real(self, model, inputs, *a, **kw)

    monkeypatch.setattr(trainer_mod.UptrainTrainer, "compute_loss", spy)
    r = uptrain(small(base, tmp_path / "run", device="cpu", dtype="bfloat16", tokens=512))
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, "cpu")}
    assert {p.dtype for p in r.model.parameters()} == {torch.bfloat16}
    finite = [s["mse_after"] for s in r.layerwise["layers"]] + [c.ppl for c in r.curve]
    finite += [e["loss"] for e in r.train_log if "loss" in e]
    assert finite and all(float(x) == float(x) and float(x) < float("inf") for x in finite)  # no NaN, no overflow
    saved = json.loads((tmp_path / "run" / "uptrain_result.json").read_text())
    assert saved["config"]["dtype"] == "bfloat16" and saved["config"]["device"] == "cpu"
    cfg = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def _tiny_base(tmp_path: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_attn_swap.zoo import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    out = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
