"""KV bytes (measured == analytic), peak memory, and the speed harness on tiny random models."""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from hf_attn_swap import kv_heads_per_layer, swap_attention
from hf_attn_swap.eval.memory import (
    PeakMemory,
    analytic_kv_bytes,
    full_kv_bytes,
    kv_bytes_report,
    measure_kv_bytes,
    prefill_cache,
)
from hf_attn_swap.eval.speed import Timing, decode_throughput, environment, num_threads, prefill_latency, time_fn
from hf_attn_swap.hf_compat import cache_kwarg, output_cache


@pytest.fixture(scope="module")
def mha():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=8, head_dim=8, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _ids(b: int, n: int) -> torch.Tensor:
    return torch.randint(0, 101, (b, n), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("variant,options,kv_heads", [
    ("baseline", {}, 8), ("gqa", {"groups": 4}, 4), ("gqa", {"groups": 2, "strategy": "first"}, 2), ("mqa", {}, 1),
], ids=["mha", "gqa4", "gqa2-first", "mqa"])
@pytest.mark.parametrize("batch,n", [(1, 37), (3, 20)])
def test_measured_kv_bytes_equal_analytic(mha, variant, options, kv_heads, batch, n):
    m = mha if variant == "baseline" else swap_attention(copy.deepcopy(mha), variant, **options)
    assert kv_heads_per_layer(m) == [kv_heads] * 3
    measured = measure_kv_bytes(prefill_cache(m, _ids(batch, n)))
    expected = 3 * 2 * batch * kv_heads * n * 8 * 4  # layers * (K, V) * b * H_kv * n * head_dim * fp32
    analytic, per_layer = analytic_kv_bytes(m, n, batch=batch)
    assert measured.total == measured.kv_only == measured.storage == analytic == expected
    assert per_layer == [expected // 3] * 3
    assert measured.seq_len == n
    assert full_kv_bytes(m, n, batch=batch) == expected


def test_kv_bytes_in_bfloat16(mha):
    m = copy.deepcopy(mha).to(torch.bfloat16)
    measured = measure_kv_bytes(prefill_cache(m, _ids(1, 10)))
    assert measured.total == analytic_kv_bytes(m, 10)[0] == 3 * 2 * 8 * 10 * 8 * 2


def test_transformers_sliding_window_cache():
    """Mistral's own sliding layer keeps window - 1 tokens; right after prefill it still pins the full storage."""
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, sliding_window=16)
    m = MistralForCausalLM(cfg).eval()
    measured = measure_kv_bytes(prefill_cache(m, _ids(2, 50)))
    per_token = 2 * 2 * 2 * 8 * 4  # layers * (K,V) * H_kv * head_dim * fp32, batch 1
    assert measured.total == analytic_kv_bytes(m, 50, batch=2)[0] == 2 * 15 * per_token
    assert measured.storage == 2 * 50 * per_token  # views into the prefill K/V
    assert analytic_kv_bytes(m, 10, batch=2)[0] == 2 * 10 * per_token  # shorter than the window: everything


def test_variant_cache_layers(mha):
    """Variants with their own cache layers: K/V of a window, or a constant-size recurrent state."""
    sw = swap_attention(copy.deepcopy(mha), "sliding_window", window=16, sinks=4)
    r = kv_bytes_report(sw, 50, batch=2)
    assert r["kv_bytes_kv_only"] == r["kv_bytes_analytic"] == 3 * 2 * 2 * 8 * (4 + 15) * 8 * 4
    assert r["kv_bytes"] >= r["kv_bytes_kv_only"]  # plus bookkeeping (validity mask)
    assert r["kv_bytes_full"] == 3 * 2 * 2 * 8 * 50 * 8 * 4
    lin = swap_attention(copy.deepcopy(mha), "linear")
    small, big = kv_bytes_report(lin, 20)["kv_bytes"], kv_bytes_report(lin, 80)["kv_bytes"]
    assert small == big == analytic_kv_bytes(lin, 80)[0]  # constant in the context length


def test_peak_memory_keeps_the_peak_between_entry_and_exit(monkeypatch):
    """The poller must see a peak that is gone again by exit: RSS is scripted, so the figures are exact (process RSS
    itself is shared with everything else in the process and cannot be asserted on)."""
    import threading

    from hf_attn_swap.eval import memory

    rss = {"now": 100 * 2**20}
    seen = threading.Event()

    def fake_rss() -> int:
        if rss["now"] == 900 * 2**20:
            seen.set()
        return rss["now"]

    monkeypatch.setattr(memory, "_rss_bytes", fake_rss)
    with PeakMemory("cpu", interval=0.001) as mem:
        rss["now"] = 900 * 2**20  # the transient peak
        assert seen.wait(5), "the polling thread never sampled"
        rss["now"] = 200 * 2**20  # freed again before exit
    assert (mem.kind, mem.start, mem.peak, mem.delta) == ("cpu_rss", 100 * 2**20, 900 * 2**20, 800 * 2**20)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_rss_reader_reads_this_process():
    from hf_attn_swap.eval.memory import _rss_bytes

    with open(f"/proc/{os.getpid()}/status") as fh:  # another view of the same counter: VmRSS in kB
        vm_rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    assert _rss_bytes() == pytest.approx(vm_rss, rel=0.05)


def test_timing_statistics():
    t = Timing.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_ms, t.min_ms, t.max_ms, t.n) == (3.0, 1.0, 5.0, 5)
    assert t.q1_ms == 2.0 and t.q3_ms == 4.0
    calls = []
    time_fn(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5
    with pytest.raises(ValueError):
        time_fn(lambda: None, repeats=0)


def test_threads_are_set_recorded_and_restored(mha):
    before = torch.get_num_threads()
    with num_threads(1) as n:
        assert n == 1 and environment(mha)["threads"] == 1
        env = environment(mha)
    assert torch.get_num_threads() == before
    assert {"device", "dtype", "threads", "torch", "transformers"} <= set(env) and env["dtype"] == "float32"


def test_prefill_and_decode_cells(mha):
    with num_threads(1):
        pre = prefill_latency(mha, [8, 16], warmup=1, repeats=2)
        dec = decode_throughput(mha, [8, 24], [1, 3], steps=3, warmup=1)
    assert [c["length"] for c in pre] == [8, 16] and all(c["n"] == 2 and c["median_ms"] > 0 for c in pre)
    assert [(c["context"], c["batch"]) for c in dec] == [(8, 1), (8, 3), (24, 1), (24, 3)]
    for c in dec:
        assert c["n"] == 3 and c["tokens_per_s"] == pytest.approx(c["batch"] / (c["median_ms"] / 1e3))
        assert c["tokens_per_s_q1"] <= c["tokens_per_s"] <= c["tokens_per_s_q3"]


def test_batch_repeated_cache_decodes_like_a_batched_prefill(mha):
    """The decode harness prefills one row and repeats the cache; the next tokens equal a real batched prefill's."""
    from hf_attn_swap.eval.speed import _prefilled

    ids = _ids(1, 12).expand(3, 12).contiguous()
    cache, nxt = _prefilled(mha, ids)
    with torch.no_grad():
        out = mha(input_ids=ids, use_cache=True)
        ref_nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        name = cache_kwarg(mha)
        a = mha(input_ids=nxt, **{name: cache}, use_cache=True).logits
        b = mha(input_ids=ref_nxt, **{name: output_cache(out)}, use_cache=True).logits
    assert torch.equal(nxt, ref_nxt)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32


def test_round_robin_speed_survives_a_failing_model(mha):
    from hf_attn_swap.eval.speed import compare_speed

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = mha.config

        def forward(self, **kw):
            raise RuntimeError("kernel missing")

    other = swap_attention(copy.deepcopy(mha), "mqa")
    with num_threads(1):
        res, errors = compare_speed({"a": mha, "broken": Broken(), "b": other}, prefill_lengths=[8], decode_contexts=[8],
                                    decode_batch_sizes=[2], steps=3, warmup=0, decode_warmup=1, repeats=2)
    assert set(errors) == {"broken"} and "kernel missing" in errors["broken"]
    for name in ("a", "b"):
        assert res[name]["prefill"][0]["n"] == 2 and res[name]["decode"][0]["n"] == 3
    assert res["b"]["decode"][0]["kv_bytes"] == res["a"]["decode"][0]["kv_bytes"] // 8  # 8 -> 1 KV heads


def test_compiled_static_decode_is_timed_frozen_and_steps_like_eager(mha, monkeypatch):
    """compare_speed(compile=True): every model's static-cache step goes through torch.compile with inductor's freezing
    on a CPU (weights as prepacked constants), and the compiled step decodes the same tokens as the eager model."""
    from hf_attn_swap.eval import speed

    seen, real = [], torch.compile

    def recording(model, **kw):
        compiled = real(model, **kw)

        def step(**inputs):  # the compiled step against the eager one, from copies of the same cache
            seen.append(torch._inductor.config.freezing)
            eager_cache = copy.deepcopy(inputs[cache_kwarg(model)])
            want = model(**{**inputs, cache_kwarg(model): eager_cache}).logits
            got = compiled(**inputs).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            return types.SimpleNamespace(logits=got)

        return step

    monkeypatch.setattr(torch, "compile", recording)
    models = {"a": mha, "mqa": swap_attention(copy.deepcopy(mha), "mqa")}
    with num_threads(1):
        res, errors = speed.compare_speed(models, prefill_lengths=[], decode_contexts=[16], decode_batch_sizes=[2],
                                          steps=2, decode_warmup=1, fill="random", cache="static", compile=True)
    assert not errors, errors
    assert seen and all(seen)  # every compiled call ran (and compiled) with freezing on
    assert not torch._inductor.config.freezing  # and only there
    assert all(res[k]["decode"][0]["compiled"] and res[k]["decode"][0]["n"] == 2 for k in models)


def test_compiled_forward_never_falls_back_to_eager_code_past_dynamos_recompile_limit():
    """Every (model, batch, cache length) cell of a compiled measurement is a graph of its own; past dynamo's default
    limit (8) torch.compile would silently run the rest eagerly, so compiled_forward raises the limit (and would fail
    rather than fall back): ten shapes, ten graphs, dynamo's own limit untouched outside the calls."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from hf_attn_swap.eval import speed

    torch._dynamo.reset()
    forward = speed.compiled_forward(torch.nn.Linear(4, 4).eval())
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for rows in range(1, 11):
            forward(torch.randn(rows, 4))
    assert counters["stats"]["unique_graphs"] - before == 10
    assert dynamo_config.recompile_limit == 8 and not dynamo_config.fail_on_recompile_limit_hit
    torch._dynamo.reset()


def _packed_weights() -> int:
    """How many weight matrices prepacked for the CPU GEMM are alive in this process: what freezing bakes into each
    compiled graph (one per linear layer), so the count of graphs' weights alive."""
    import gc
    import warnings

    with warnings.catch_warnings():  # gc also finds deprecated torch objects, which warn when touched
        warnings.simplefilter("ignore")
        return sum(type(o) is torch.Tensor and o.layout == torch._mkldnn for o in gc.get_objects())


def _settle_compiled_graphs() -> int:
    """Release every compiled graph, after compiling one without weights (torch keeps its latest graph alive until
    the next compilation, which may be an earlier test's, holding weights); the packed weights then alive."""
    from hf_attn_swap.eval import speed

    torch.compile(lambda x: x + 1)(torch.ones(3))
    speed.release_compiled_graphs()
    return _packed_weights()


def test_compiled_graphs_frozen_weights_do_not_pile_up():
    """A frozen graph keeps its own prepacked copy of the weights for the life of the process unless released: a
    compiled grid on SmolLM2 grew by ~1 GB a cell. With release_compiled_graphs between shapes only the latest graph's
    copy stays (torch holds on to its last compiled graph until the next compilation), and the compiled function
    still computes the model (it compiles again)."""
    from hf_attn_swap.eval import speed

    base = _settle_compiled_graphs()
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).eval()
    forward = speed.compiled_forward(model)
    with torch.no_grad(), num_threads(1):
        forward(torch.ones(1, 256))
        forward(torch.ones(2, 256))
        assert _packed_weights() - base == 4  # the failure guarded against: two shapes, two graphs, four copies
        speed.release_compiled_graphs()
        for rows in (3, 4, 5):
            torch.testing.assert_close(forward(torch.ones(rows, 256)), model(torch.ones(rows, 256)))
            speed.release_compiled_graphs()
            assert _packed_weights() - base <= 2, rows  # at most the latest graph's copies


def test_compiled_measurement_frees_each_cells_graphs(mha, monkeypatch):
    """compare_speed(compile=True) releases the graphs after each cell: the copies alive after the second cell are no
    more than after the first."""
    from hf_attn_swap.eval import speed

    base, counts, real = _settle_compiled_graphs(), [], speed.release_compiled_graphs
    monkeypatch.setattr(speed, "release_compiled_graphs", lambda: (real(), counts.append(_packed_weights() - base)))
    with num_threads(1):
        res, errors = speed.compare_speed({"a": mha}, prefill_lengths=[], decode_contexts=[16, 24],
                                          decode_batch_sizes=[2], steps=1, decode_warmup=1, fill="random",
                                          cache="static", compile=True)
    assert not errors, errors
    assert [r["compiled"] for r in res["a"]["decode"]] == [True, True]
    assert len(counts) == 2 and 0 < counts[1] <= counts[0], counts  # 0 <: the graphs do hold packed weights


def test_hybrid_cache_is_window_plus_state(mha):
    """linear with a softmax window: K/V of window - 1 tokens plus the recurrent state, constant past the window."""
    hy = swap_attention(copy.deepcopy(mha), "linear", feature_map="hedgehog", num_features=8, window=12)
    a, b = kv_bytes_report(hy, 30, batch=2), kv_bytes_report(hy, 90, batch=2)
    state = 3 * 2 * 8 * (16 * 8 + 16) * 4  # layers * b * H_kv * (m*d + m) fp32, m = 2 * num_features
    kv = 3 * 2 * 2 * 8 * 11 * 8 * 4  # layers * (K,V) * b * H_kv * (window - 1) * d * fp32
    assert a["kv_bytes_analytic"] == b["kv_bytes_analytic"] == state + kv
    assert a["kv_bytes_kv_only"] == b["kv_bytes_kv_only"] == state + kv
    assert a["kv_bytes"] == b["kv_bytes"] > state + kv  # plus the validity mask
