"""Layer-by-layer calibration equals whole-model calibration; device/dtype handling; checks before loading."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers as tf

from hf_attn_swap import swap_attention
from hf_attn_swap.convert import calibrate
from hf_attn_swap.convert.adapters import get_adapter
from hf_attn_swap.convert.calibrate import (
    decoder_layers,
    input_second_moments,
    layerwise_second_moments,
    second_moments,
)
from hf_attn_swap.convert.projections import find_attention

from tiny_models import TINY, tiny

REL = 1e-10


def _modules(model):
    return [s.module for s in find_attention(model, get_adapter(model))]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b))


def _whole_model(model, mods, cal, **kw):
    """What ``gqa`` calls, forced onto the whole-model path."""
    return second_moments(model, mods, cal, method="whole", **kw)


def _calibration(model_type: str, seed: int = 0):
    ids = torch.randint(3, 100, (5, 24), generator=torch.Generator().manual_seed(seed))
    if model_type != "bert":
        return ids
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # padding is excluded from the statistics in both paths
    return [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_layerwise_equals_whole_model_on_every_architecture(model_type):
    model = tiny(model_type)
    mods = _modules(model)
    cal = _calibration(model_type)
    whole, n_whole = input_second_moments(model, mods, cal)
    layer, n_layer = layerwise_second_moments(model, mods, cal, device="cpu")
    assert decoder_layers(model, mods) is not None  # every adapter row's family takes the layer-by-layer path
    assert n_whole == n_layer == (120 - 7 if model_type == "bert" else 120)
    assert all(c.dtype == torch.float64 for c in layer)
    assert _rel(whole, layer) < REL


@pytest.mark.parametrize(
    "make",
    [
        # Gemma 3 passes a sliding mask and local rotary tables to sliding layers, a full mask to the others;
        # Qwen 3 with sliding layers: different masks per layer. Capturing only layer 0's kwargs would be wrong here.
        lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, head_dim=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
        lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=1,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    ],
    ids=["gemma3_mixed_layers", "qwen3_sliding_layers"],
)
def test_layerwise_passes_each_layer_its_own_mask_and_rotary(make):
    torch.manual_seed(0)
    model = make().eval()
    mods = _modules(model)
    ids = _calibration("llama")
    whole, _ = input_second_moments(model, mods, ids)
    layer, _ = layerwise_second_moments(model, mods, ids)
    assert _rel(whole, layer) < REL


def test_layerwise_runs_no_layer_after_the_last_watched_one():
    model = tiny("llama")
    mods = _modules(model)
    calls = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        part, _ = layerwise_second_moments(model, mods[:1], _calibration("llama"))
    finally:
        handle.remove()
    assert calls == []
    whole, _ = input_second_moments(model, mods[:1], _calibration("llama"))
    assert _rel(whole, part) < REL


def test_each_statistic_is_handed_over_before_the_next_layer_runs(monkeypatch):
    model = tiny("llama")
    mods = _modules(model)
    events = []
    monkeypatch.setattr(calibrate, "BATCH_TOKENS", 4 * 24)  # 4 rows of 24 tokens per batch
    handle = mods[1].register_forward_pre_hook(lambda *a: events.append("layer 1 runs"))
    try:
        results, _ = layerwise_second_moments(
            model, mods, _calibration("llama"), consume=lambda i, c: events.append(f"stat {i}") or c.shape)
    finally:
        handle.remove()
    # 5 rows in batches of 4 -> 2 batches through layer 1, after layer 0's statistic was consumed (and dropped).
    assert events == ["stat 0", "layer 1 runs", "layer 1 runs", "stat 1"]
    assert results == [torch.Size([65, 65])] * 2


def test_failure_inside_a_layer_leaves_the_model_as_it_was():
    model = tiny("llama")
    ids = _calibration("llama")
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*_args, **_kwargs):
        raise RuntimeError("injected")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="injected"):
        swap_attention(model, "gqa", groups=2, strategy="fit", calibration=ids)
    handle.remove()
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # capture stubs removed
    assert all(m._forward_pre_hooks == {} for m in _modules(model))  # statistic hooks removed
    assert model.config.num_key_value_heads == 4
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, before)


def test_default_conversion_is_layerwise_and_equals_whole_model_conversion(monkeypatch):
    ids = _calibration("qwen2")
    a, b = tiny("qwen2"), tiny("qwen2")
    used = []
    real = calibrate.layerwise_second_moments
    monkeypatch.setattr(calibrate, "layerwise_second_moments", lambda *x, **k: used.append(1) or real(*x, **k))
    swap_attention(a, "gqa", groups=1, strategy="fit", calibration=ids)
    assert used == [1]
    import hf_attn_swap.variants.gqa as gqa

    monkeypatch.setattr(gqa, "second_moments", _whole_model)
    swap_attention(b, "gqa", groups=1, strategy="fit", calibration=ids)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7) for k in sa)


def test_real_smollm2_layerwise_statistics_and_weights_equal_whole_model(smollm2, monkeypatch):
    from hf_attn_swap.data import load_text, token_blocks

    model, tok = smollm2
    ids = token_blocks(tok, load_text("shakespeare", split="train"), 128, max_tokens=384)  # 3 x 128 real tokens
    mods = _modules(model)
    whole, n = input_second_moments(model, mods, ids)
    layer, m = layerwise_second_moments(model, mods, ids, device="cpu")
    assert n == m == 384 and len(layer) == 30
    assert _rel(whole, layer) < REL

    import hf_attn_swap.variants.gqa as gqa

    a = copy.deepcopy(model)
    swap_attention(a, "gqa", groups=1, strategy="fit", calibration=ids, layers="0-3")
    b = copy.deepcopy(model)
    monkeypatch.setattr(gqa, "second_moments", _whole_model)
    swap_attention(b, "gqa", groups=1, strategy="fit", calibration=ids, layers="0-3")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-6, atol=1e-6) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.k_proj.weight"][:64],
                           model.state_dict()["model.layers.0.self_attn.k_proj.weight"][:64])


def test_bf16_model_on_cpu_runs_layers_in_float32_and_is_left_bit_identical():
    model = tiny("llama").to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mods = _modules(model)
    ids = _calibration("llama")
    seen = []
    handle = mods[1].register_forward_pre_hook(lambda _m, a, k: seen.append(k["hidden_states"].dtype), with_kwargs=True)
    covs, _ = second_moments(model, mods, ids, device="cpu")
    handle.remove()
    assert seen and set(seen) == {torch.float32}
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # Exactly the statistics of a float32 copy of the bf16 weights (rotary tables and masks built in float32 too).
    ref = tiny("llama").to(torch.bfloat16).float()
    whole, _ = input_second_moments(ref, _modules(ref), ids)
    assert _rel(whole, covs) < REL
    # compute_dtype=None keeps the model's dtype (what a GPU run does): bf16 layers, the same statistics as a
    # whole-model bf16 forward.
    seen.clear()
    handle = mods[1].register_forward_pre_hook(lambda _m, a, k: seen.append(k["hidden_states"].dtype), with_kwargs=True)
    bf16, _ = layerwise_second_moments(model, mods, ids, compute_dtype=None)
    handle.remove()
    assert set(seen) == {torch.bfloat16}
    assert _rel(input_second_moments(model, mods, ids)[0], bf16) < REL


def test_bf16_fit_runs_in_float64_and_stores_bf16_weights(monkeypatch):
    import hf_attn_swap.variants.gqa as gqa

    model = tiny("llama").to(torch.bfloat16)
    ids = _calibration("llama")
    covs, tokens = second_moments(model, _modules(model), ids)
    assert covs[0].dtype == torch.float64
    swap_attention(model, "gqa", groups=2, strategy="fit", calibration=ids)
    # The same statistics and an exact float32 copy of the bf16 weights: the fit runs in float64 either way, so the
    # bf16 model's new weights are exactly the float32 result rounded once to bf16.
    ref = tiny("llama").to(torch.bfloat16).float()
    monkeypatch.setattr(gqa, "second_moments",
                        lambda m, mods, cal, consume: ([consume(i, c.clone()) for i, c in enumerate(covs)], tokens))
    swap_attention(ref, "gqa", groups=2, strategy="fit", calibration=ids)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, q.to(torch.bfloat16)), name


def test_model_loaded_with_device_map_converts_like_a_plain_one(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    mapped = tf.LlamaForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"}).eval()
    ids = _calibration("llama")
    swap_attention(model, "gqa", groups=1, strategy="fit", calibration=ids)
    swap_attention(mapped, "gqa", groups=1, strategy="fit", calibration=ids)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), mapped.state_dict().values()))


def test_offloaded_model_calibrates_through_accelerate_hooks_and_conversion_is_refused_cleanly():
    from accelerate import cpu_offload

    plain = tiny("llama")
    ids = _calibration("llama")
    whole, _ = input_second_moments(plain, _modules(plain), ids)
    model = cpu_offload(tiny("llama"), execution_device="cpu")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    layer, _ = layerwise_second_moments(model, _modules(model), ids)
    assert _rel(whole, layer) < REL
    before = model(ids).logits
    with pytest.raises(ValueError, match="offloaded .* needs them materialised"):
        swap_attention(model, "gqa", groups=2, strategy="fit", calibration=ids)
    assert model.config.num_key_value_heads == 4
    assert torch.equal(model(ids).logits, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_calibrates_on_its_device_and_keeps_weights_there():
    cpu_model = tiny("llama")
    ids = _calibration("llama")  # on the CPU: calibration moves it to the model's device
    model = tiny("llama").cuda()
    mods = _modules(model)
    covs, _ = second_moments(model, mods, ids)
    assert covs[0].device.type == "cuda"
    ref, _ = input_second_moments(cpu_model, _modules(cpu_model), ids)
    assert _rel(ref, [c.cpu() for c in covs]) < 1e-4  # GPU kernels round differently; the statistics agree
    swap_attention(model, "gqa", groups=2, strategy="fit", calibration=ids)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model(ids.cuda()).logits.isfinite().all()


# ---------------------------------------------------------------------------------------------- loading checks


@pytest.fixture()
def bf16_folder(tmp_path):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_local_folder_loads_in_the_chosen_dtype_without_a_tokenizer(bf16_folder):
    from safetensors.torch import load_file

    from hf_attn_swap.zoo import load_model

    model, tok = load_model(bf16_folder, dtype="bfloat16")
    assert tok is None
    saved = load_file(bf16_folder / "model.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.fixture()
def no_load(monkeypatch):
    """Any attempt to read weights fails the test: the checks must run before loading."""
    def forbidden(*_a, **_k):
        raise AssertionError("weights were loaded before the input was refused")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(tf.AutoModel, "from_pretrained", forbidden)


def test_missing_folder_is_refused_in_one_line(tmp_path, no_load):
    from hf_attn_swap.zoo import load_model

    with pytest.raises(ValueError, match=r"does not exist; pass a short name") as err:
        load_model(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_folder_that_is_not_a_causal_lm_is_refused(bf16_folder, tmp_path, no_load):
    from hf_attn_swap.zoo import load_model

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(empty)
    config = json.loads((bf16_folder / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (bf16_folder / "config.json").write_text(json.dumps(config))
    snap = _snapshot(bf16_folder)
    with pytest.raises(ValueError, match=r"not a causal LM"):
        load_model(bf16_folder)
    assert _snapshot(bf16_folder) == snap


def test_bad_dtype_and_unavailable_device_are_refused(bf16_folder, no_load):
    from hf_attn_swap.zoo import load_model

    with pytest.raises(ValueError, match=r"unknown dtype 'float8'; allowed: float32, bfloat16, float16"):
        load_model(bf16_folder, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' needs CUDA, but .*; available here: cpu"):
            load_model(bf16_folder, device="cuda")


def test_not_enough_memory_is_refused_with_both_numbers(bf16_folder, monkeypatch, no_load):
    from hf_attn_swap import preflight
    from hf_attn_swap.zoo import load_model

    need32 = preflight.weight_bytes(bf16_folder, torch.float32)
    n_params = sum(p.numel() for p in tf.LlamaForCausalLM(tf.AutoConfig.from_pretrained(bf16_folder)).parameters())
    assert need32 == 4 * n_params
    # Enough for bfloat16 weights, not for float32 ones.
    monkeypatch.setattr(preflight, "available_bytes", lambda device: need32 // 2 + 10)
    snap = _snapshot(bf16_folder)
    with pytest.raises(ValueError, match=rf"need 0\.\d\d GiB in float32 but cpu has 0\.\d\d GiB available") as err:
        load_model(bf16_folder, dtype="float32")
    assert "\n" not in str(err.value)
    assert preflight.preflight(bf16_folder, "bfloat16", "cpu") == need32 // 2
    assert _snapshot(bf16_folder) == snap


def test_cli_converts_a_bf16_folder_in_bf16(bf16_folder, tmp_path, capsys):
    from hf_attn_swap.cli import main

    out = tmp_path / "out"
    rc = main(["convert", "--model", str(bf16_folder), "--variant", "gqa:groups=2,strategy=fit", "--eval-tokens",
               "0", "--calib-tokens", "1024", "--dtype", "bfloat16", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "1024 random token ids" in text
    report = json.loads(text[text.index("\n{") + 1:])
    assert report["steps"][0]["calibration_tokens"] == 1024
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    rc = main(["convert", "--model", str(bf16_folder), "--variant", "gqa:groups=2", "--eval-tokens", "16"])
    assert rc == 2 and "has no tokenizer" in capsys.readouterr().err
    assert os.path.isdir(bf16_folder)
