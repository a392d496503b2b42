"""The roofline model: byte and FLOP counts against hand-computed values, published models, hardware profiles, the
``plan`` projection and command, and the cache sizes it predicts against real cache objects."""

from __future__ import annotations

import json

import pytest
import torch

from hf_attn_swap import swap_attention
from hf_attn_swap.cli import main
from hf_attn_swap.eval import roofline as rl
from hf_attn_swap.eval.cache_fill import fill_cache
from hf_attn_swap.eval.memory import measure_kv_bytes

from tiny_models import tiny

# A tiny decoder: 2 layers, hidden 16, 4 query heads, 2 KV heads, head size 4, MLP 32, vocab 50, tied embeddings.
# Matrix parameters per layer: q 16*16 + o 16*16 = 512, k/v 2*16*(2*4) = 256, MLP 3*16*32 = 1536 -> 2304;
# two layers 4608, LM head 50*16 = 800 -> 5408. Norms (2 per layer + final) 5*16 = 80.
TINY = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 32, "vocab_size": 50,
        "tie_word_embeddings": True}


@pytest.fixture
def shape():
    return rl.model_shape(TINY)


def v(shape, spec):
    (one,) = rl.parse_variants(shape, spec)
    return one


# context 10, batch 3, 2 bytes per element. Weights: (5408 + 80) * 2 = 10976, plus 3 embedding rows 3*16*2 = 96.
# Dense FLOPs 2 * 3 * 5408 = 32448.
@pytest.mark.parametrize("spec, weights, read, write, flops", [
    # K/V read 2*b*Hkv*c*d*e = 2*3*2*10*4*2 = 960 per layer; write 2*3*2*4*2 = 96; attention 4*b*H*(c+1)*d = 2112
    ("baseline", 11072, 2 * 960, 2 * 96, 32448 + 2 * 2112),
    # 1 KV head: k/v params 2*16*4 = 128 per layer (5152 in all): weights (5152+80)*2 + 96 = 10560; 2*5152*3 = 30912
    ("mqa", 10560, 2 * 480, 2 * 48, 30912 + 2 * 2112),
    ("gqa:groups=2", 11072, 2 * 960, 2 * 96, 32448 + 2 * 2112),  # groups = the KV heads it already has
    # window 4 + 1 sink keeps 4 tokens: read 2*3*2*4*4*2 = 384; attends min(11, 5) = 5 keys: 4*3*4*5*4 = 960
    ("sliding_window:window=4,sinks=1", 11072, 2 * 384, 2 * 96, 32448 + 2 * 960),
    # elu: m = d = 4; state 3 * 2 * (4*4 + 4) fp32 = 480 bytes read and written; FLOPs 2*3*4*4*5 + 2*3*2*4*5 = 720
    ("linear", 11072, 2 * 480, 2 * 480, 32448 + 2 * 720),
    # window 3 keeps 2 tokens: 2*3*2*2*4*2 = 192 + state 480; writes 96 + 480; attends 3: 4*3*4*3*4 = 576 + 720
    ("hybrid:window=3", 11072, 2 * 672, 2 * 576, 32448 + 2 * 1296),
    ("linear:window=3", 11072, 2 * 672, 2 * 576, 32448 + 2 * 1296),  # the same variant, written as linear
])
def test_decode_cost_by_hand(shape, spec, weights, read, write, flops):
    cost = rl.decode_cost(shape, v(shape, spec), 10, batch=3, dtype_bytes=2)
    assert (cost.weight_bytes, cost.cache_read_bytes, cost.cache_write_bytes, cost.flops) == (weights, read, write,
                                                                                              flops)
    assert cost.bytes == weights + read + write


# prefill of 5 tokens (6 with sinks), batch 1, 2 bytes: dense FLOPs 2*5*4608 + 2*800 = 47680 (6 tokens: 56896);
# weight bytes 10976 + the 5 embedding rows 5*16*2 = 160.
@pytest.mark.parametrize("spec, n, write, flops", [
    ("baseline", 5, 2 * 160, 47680 + 2 * 4 * 4 * 4 * 15),  # 15 causal pairs; cache 2*2*5*4*2 = 160 per layer
    ("sliding_window:window=2", 5, 2 * 2 * 2 * 1 * 4 * 2, 47680 + 2 * 64 * 9),  # pairs 1+2+2+2+2; keeps 1 token
    # window 3 + 1 sink, 6 tokens: pairs 1+2+3+4+4+4 = 18; keeps 3 tokens
    ("sliding_window:window=3,sinks=1", 6, 2 * 2 * 2 * 3 * 4 * 2, 56896 + 2 * 64 * 18),
    ("linear", 5, 2 * 2 * 20 * 4, 47680 + 2 * 2 * 5 * 6 * 4 * 5),  # state written once; 2*n*(H+Hkv)*m*(d+1)
])
def test_prefill_cost_by_hand(shape, spec, n, write, flops):
    cost = rl.prefill_cost(shape, v(shape, spec), n, batch=1, dtype_bytes=2)
    assert cost.weight_bytes == 10976 + n * 32
    assert (cost.cache_read_bytes, cost.cache_write_bytes, cost.flops) == (0, write, flops)


def test_time_is_the_sum_of_the_matrix_and_attention_rooflines(shape):
    hw = rl.hardware_from_dict({"name": "toy", "bandwidth_gb_s": 1e-6, "flops_tflops": 1e-9, "memory_gb": 1,
                                "dtype": "bf16", "source": "test"})  # 1000 B/s, 1000 FLOP/s
    cost = rl.decode_cost(shape, v(shape, "baseline"), 10, batch=3, dtype_bytes=2)
    assert cost.attention_flops == 2 * 2112
    # matrices: max(11072 B, 32448 FLOP) -> 32.448 s; attention: max(1920 + 192 B, 4224 FLOP) -> 4.224 s
    assert hw.time_s(cost) == pytest.approx(32.448 + 4.224)
    assert hw.bound(cost) == "compute"
    slow_memory = rl.hardware_from_dict({"name": "toy", "bandwidth_gb_s": 1e-6, "flops_tflops": 1e-7,
                                         "memory_gb": 1, "dtype": "bf16", "source": "test"})  # 100000 FLOP/s
    assert slow_memory.time_s(cost) == pytest.approx(11.072 + 2.112) and slow_memory.bound(cost) == "memory"


def test_published_models_match_their_parameter_counts_and_kv_sizes():
    # Parameter totals as published (Llama 2 paper / model cards): 6,738,415,616; 8,030,261,248; 70,553,706,496.
    for name, params in (("llama-2-7b", 6738415616), ("llama-3-8b", 8030261248), ("llama-3-70b", 70553706496)):
        s = rl.model_shape(name)
        assert rl.stored_weight_bytes(s, rl.resolve_variant(s, "baseline"), 1) == params
    # bf16 K/V per token: Llama-2-7B 32 layers * 2 * 32 heads * 128 * 2 = 512 KiB; Llama-3-8B (8 KV heads) 128 KiB
    assert rl.cache_bytes(rl.model_shape("llama-2-7b"), rl.resolve_variant(rl.model_shape("llama-2-7b"), "baseline"),
                          1) == 512 * 1024
    s8 = rl.model_shape("llama-3-8b")
    assert rl.cache_bytes(s8, rl.resolve_variant(s8, "baseline"), 4096, batch=2) == 2 * 4096 * 128 * 1024


@pytest.mark.parametrize("spec", ["baseline", "mqa", "sliding_window:window=6,sinks=2", "linear", "hybrid:window=5",
                                  "linear:feature_map=hedgehog,window=5"])
def test_cache_bytes_equal_the_real_cache_layers(spec):
    """The model's cache size is what the variant's real cache layer holds (filled to 20 tokens, batch 2, fp32)."""
    from hf_attn_swap.specs import parse_variant_list

    model = tiny("llama")
    shape = rl.model_shape(model.config)
    (name, opts), = parse_variant_list(spec)
    vs = rl.resolve_variant(shape, name, opts)
    if name != "baseline":
        swap_attention(model, "linear" if name == "hybrid" else name, **opts)
    cache = fill_cache(model, 20, 2)
    assert measure_kv_bytes(cache).kv_only == rl.cache_bytes(shape, vs, 20, batch=2, dtype_bytes=4)


def test_bad_configs_and_variants_get_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="model_type 'bert' is not a decoder.*allowed: llama"):
        rl.model_shape({"model_type": "bert", "hidden_size": 8})
    with pytest.raises(ValueError, match="lacks 'intermediate_size'"):
        rl.model_shape({k: x for k, x in TINY.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="neither a config.json.*allowed names: llama-2-7b"):
        rl.model_shape(str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert rl.model_shape(tmp_path).layers == 2  # a folder with a config.json
    s = rl.model_shape(TINY)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        rl.resolve_variant(s, "gqa", {"groups": 3})
    with pytest.raises(ValueError, match="unknown variant 'sparse'.*allowed: baseline, gqa"):
        rl.resolve_variant(s, "sparse")
    with pytest.raises(ValueError, match="sinks must be smaller than window"):
        rl.resolve_variant(s, "sliding_window", {"window": 4, "sinks": 4})


def test_hardware_profiles():
    for hw in rl.GPU_PROFILES.values():
        assert hw.bandwidth > 1e12 and hw.flops > 1e14 and hw.memory >= 80e9 and "datasheet" in hw.source
    with pytest.raises(ValueError, match=r"missing \['flops_tflops', 'memory_gb', 'dtype', 'source'\].*required"):
        rl.hardware_from_dict({"name": "x", "bandwidth_gb_s": 1})
    with pytest.raises(ValueError, match="bandwidth_gb_s must be a positive number"):
        rl.hardware_from_dict({"name": "x", "bandwidth_gb_s": 0, "flops_tflops": 1, "memory_gb": 1,
                               "dtype": "bf16", "source": "s"})
    with pytest.raises(ValueError, match="unknown hardware 'X100'; allowed: A100-80GB, H100-SXM, H200, cpu"):
        rl.get_hardware("X100")
    cpu = rl.measure_cpu(1, size_mb=8, matmul=128, min_run_time=0.05, rounds=3)
    assert cpu.bandwidth > 1e8 and cpu.flops > 1e8 and cpu.memory > 0 and cpu.extra["threads"] == 1
    # the figure is the median of the rounds, each kept
    assert len(cpu.extra["bandwidth_samples"]) == 3 == len(cpu.extra["copy_samples"])
    assert cpu.bandwidth == sorted(cpu.extra["bandwidth_samples"])[1]
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        rl.measure_cpu(1, size_mb=8, matmul=128, rounds=0)


def test_plan_projects_time_batch_and_bytes():
    rows = rl.plan("llama-2-7b", "baseline,gqa:groups=8,sliding_window:window=4096,linear", "H100-SXM",
                   contexts=[4096, 32768], batch=4)
    by = {(r["variant"], r["context"]): r for r in rows}
    base = by[("baseline", 4096)]
    s = rl.model_shape("llama-2-7b")
    cost = rl.decode_cost(s, rl.resolve_variant(s, "baseline"), 4096, batch=4, dtype_bytes=2)
    assert base["ms_per_step"] == pytest.approx(cost.bytes / 3.35e12 * 1e3) and base["bound"] == "memory"
    assert cost.attention_flops == 32 * 4 * 4 * 32 * 4097 * 128
    assert base["tokens_per_s"] == pytest.approx(4 / base["ms_per_step"] * 1e3)
    assert base["cache_bytes_per_seq"] == 2 * 2**30  # 4096 tokens * 512 KiB
    assert base["max_batch"] == int((80e9 - 2 * 6738415616) // 2**31)
    assert by[("gqa:groups=8", 4096)]["cache_bytes_per_seq"] == 2**31 // 4
    # the window stops growing, linear attention never does: the baseline's time grows with the context
    assert by[("sliding_window:window=4096", 32768)]["ms_per_step"] == pytest.approx(
        by[("sliding_window:window=4096", 4096)]["ms_per_step"], rel=1e-3)
    assert by[("baseline", 32768)]["ms_per_step"] > 2 * by[("linear", 32768)]["ms_per_step"]
    # 70B in bf16 does not fit one H200 beside any cache; two do
    assert rl.plan("llama-3-70b", "baseline", "H200", contexts=[4096])[0]["max_batch"] == 0
    two = rl.plan("llama-3-70b", "baseline", "H200", contexts=[4096], devices=2)[0]
    assert two["max_batch"] > 0 and two["hardware"] == "2x H200"


def test_plan_command(capsys, tmp_path):
    assert main(["plan", "--model", "llama-3-8b", "--variants", "baseline,mqa", "--hardware", "[H200]",
                 "--contexts", "[8192]", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in rows] == ["baseline", "mqa"] and rows[0]["hardware"] == "H200"
    assert rows[0]["cache_bytes_per_seq"] == 8 * rows[1]["cache_bytes_per_seq"]
    bad = tmp_path / "hw.json"
    bad.write_text(json.dumps({"name": "mine", "bandwidth_gb_s": 100}))
    assert main(["plan", "--hardware", f"[{bad}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "required fields" in err[0]
    assert main(["plan", "--model", str(tmp_path / "none")]) == 2
    assert "allowed names" in capsys.readouterr().err


def test_speed_at_scale_results_command_end_to_end(tmp_path, monkeypatch):
    """bench/speed_at_scale.py on a tiny local model: JSON with provenance, predictions beside measurements, a
    skipped cell that does not fit, Markdown tables and both plots."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("matplotlib")
    model = tiny("llama")
    model.save_pretrained(tmp_path / "tiny")
    path = Path(__file__).resolve().parent.parent / "bench" / "speed_at_scale.py"
    spec = importlib.util.spec_from_file_location("speed_at_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "res" / "sas"
    from hf_attn_swap.eval import speed

    # 100 kB "available": the full caches at 4096 tokens (2 MB, 1 MB) are skipped, the 8-token window still fits
    monkeypatch.setattr(speed, "available_memory", lambda device: 100_000)
    assert bench.main(["--model", str(tmp_path / "tiny"), "--variants", "baseline,mqa,sliding_window:window=8",
                       "--contexts", "16,4096", "--batches", "2", "--steps", "2", "--warmup", "1",
                       "--cpu-mb", "4", "--plan-models", "llama-3-8b", "--plan-hardware", "H200",
                       "--plan-contexts", "4096", "--plan-batches", "1", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["provenance"]["threads"] == 1 and data["provenance"]["commit"] and "transformers" in data["provenance"]
    done = [r for r in data["measured"] if "measured_ms" in r]
    assert {(r["cache"], r["variant"]) for r in done} == {("dynamic", "baseline"), ("dynamic", "mqa"),
                                                           ("dynamic", "sliding_window:window=8"),
                                                           ("static", "baseline"), ("static", "mqa")}
    assert {(r["variant"], r["context"]) for r in done if r["context"] == 4096} == {("sliding_window:window=8", 4096)}
    assert all(r["predicted_ms"] > 0 for r in done)
    skipped = {(r["cache"], r["variant"]) for r in data["measured"] if "does not fit" in r.get("skipped", "")}
    assert skipped == {("dynamic", "baseline"), ("dynamic", "mqa"), ("static", "baseline"), ("static", "mqa")}
    assert {r["variant"] for r in data["plan"]} == {"baseline", "mqa", "sliding_window:window=4096", "linear",
                                                    "hybrid:window=64"}
    md = out.with_suffix(".md").read_text()
    assert "## Measured against predicted" in md and "## Projected" in md and "datasheet" in md
    # the bandwidth read again after the timed steps, beside the figure the predictions use
    assert data["bandwidth_drift"]["after_gb_s"] > 0 and "measured again after the timed steps" in md
    assert (tmp_path / "res" / "sas_decode.png").stat().st_size > 0
    assert (tmp_path / "res" / "sas_projected.png").stat().st_size > 0
    # no point at 8k x 8 in this run: the goals section says so instead of inventing a verdict
    assert data["goals"] == [] and "Not measured: the run had no point at context 8192 x batch 8" in md
    assert bench.main(["--report-only", "--out", str(out)]) == 0
    assert out.with_suffix(".md").read_text() == md


def test_speed_at_scale_goals_are_computed_from_the_figures():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "speed_at_scale.py"
    spec = importlib.util.spec_from_file_location("speed_at_scale_goals", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def data(base_ms, mqa_ms):
        rows = [{"cache": "static", "compiled": False, "variant": v, "context": 8192, "batch": 8, "measured_ms": m,
                 "predicted_ms": p} for v, m, p in (("baseline", base_ms, 200.0), ("mqa:strategy=mean", mqa_ms, 80.0))]
        rows.append({"cache": "static", "compiled": False, "variant": "baseline", "context": 512, "batch": 8,
                     "measured_ms": 999.0, "predicted_ms": 1.0})  # another shape: not the goal's
        return {"measured": rows, "speedups": bench.speedups(rows)}

    (g,) = bench.goals(data(380.0, 160.0))  # 1.9x the roofline; speed-up 2.375 of a predicted 2.5 (0.95)
    assert g["baseline_measured_over_predicted"] == pytest.approx(1.9) and g["step_goal_met"] is True
    assert g["mqa_speedup_ratio"] == pytest.approx(0.95) and g["speedup_goal_met"] is True
    (g,) = bench.goals(data(420.0, 200.0))  # 2.1x; speed-up 2.1 of 2.5 (0.84)
    assert g["step_goal_met"] is False and g["speedup_goal_met"] is False
    assert "**not met**" in "\n".join(bench.goal_lines(data(420.0, 200.0)))
    assert g["reference"] == "baseline" and g["stock_measured_over_predicted"] == pytest.approx(2.1)

    # With the package's own GQA-3 path measured, it is the reference of both goals; the stock model stays beside it.
    d = data(420.0, 200.0)
    d["measured"].append({"cache": "static", "compiled": False, "variant": "gqa:groups=3", "context": 8192, "batch": 8,
                          "measured_ms": 300.0, "predicted_ms": 200.0})
    (g,) = bench.goals(d)
    assert g["reference"] == "gqa:groups=3" and g["baseline_measured_over_predicted"] == pytest.approx(1.5)
    assert g["step_goal_met"] is True and g["stock_measured_over_predicted"] == pytest.approx(2.1)
    assert g["mqa_speedup_measured"] == pytest.approx(1.5) and g["mqa_speedup_ratio"] == pytest.approx(0.6)
    assert g["speedup_goal_met"] is False

    # The roofline's accuracy: memory-bound cells only, counted within 25%, the median and largest error
    rows = [{"cache": "static", "variant": "v", "measured_ms": m, "predicted_ms": 100.0, "error": m / 100.0 - 1,
             "bound": b} for m, b in ((110.0, "memory"), (120.0, "memory"), (190.0, "memory"), (400.0, "compute"))]
    (acc,) = bench.prediction_accuracy({"measured": rows})
    assert (acc["cells"], acc["within"]) == (3, 2)
    assert acc["median_error"] == pytest.approx(0.2) and acc["max_error"] == pytest.approx(0.9)
    assert "| static | v | 3 | 2 | +20% | +90% |" in "\n".join(bench.prediction_lines({"measured": rows}))


def test_speed_at_scale_profiles_only_cells_that_were_measured():
    """The profile step once ran the baseline at 32k x 16, a cell skipped because its cache did not fit, and the
    machine ran out of memory: it profiles at the largest context every variant was measured at, largest batch."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "speed_at_scale.py"
    spec = importlib.util.spec_from_file_location("speed_at_scale_profile", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    done = [{"cache": "static", "variant": v, "context": c, "batch": b, "measured_ms": 1.0}
            for v, c, b in (("baseline", 2048, 16), ("mqa", 2048, 16), ("mqa", 32768, 16), ("baseline", 32768, 8),
                            ("linear", 2048, 16), ("linear", 32768, 16))]
    assert bench.profile_cells(done) == [("static", "baseline", 2048, 16), ("static", "linear", 2048, 16),
                                         ("static", "mqa", 2048, 16)]
    assert bench.profile_cells(done, 32768) == [("static", "linear", 32768, 16), ("static", "mqa", 32768, 16)]
    # no context common to all: each pair at its own largest measured context at the largest batch
    assert bench.profile_cells(done[2:3] + done[4:5]) == [("static", "linear", 2048, 16), ("static", "mqa", 32768, 16)]
    assert bench.profile_cells([]) == []


def test_readme_projection_table_marks_batches_that_do_not_fit():
    """The README's projection table (bench/speed_at_scale.py:readme_projection) comes from plan rows; a cell whose 16
    sequences' caches do not fit beside the weights is marked, not shown as if it ran."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "speed_at_scale.py"
    spec = importlib.util.spec_from_file_location("speed_at_scale_projection", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = rl.plan("llama-2-7b", "baseline,mqa", "H100-SXM", contexts=list(bench.README_PROJECTION_CONTEXTS), batch=16)
    lines = bench.readme_projection({"plan": rows}).splitlines()
    body = {line.split(" | ")[1]: line for line in lines if line.startswith("| llama-2-7b")}
    assert set(body) == {"baseline", "mqa"}
    for r in rows:  # every cell: its time, starred exactly where a batch of 16 does not fit
        cell = body[r["variant"]].split(" | ")[2 + bench.README_PROJECTION_CONTEXTS.index(r["context"])]
        assert cell == f"{r['ms_per_step']:.3g}" + ("*" if r["max_batch"] < 16 else "")
    assert "*" in body["baseline"] and "*" not in body["mqa"]  # MHA's 8k cache x 16 exceeds one H100; MQA's does not
