"""``refit`` (convert/refit.py): held to a plain whole-model reference, rolled back when it fails halfway. (What it
buys on real weights is in results/gqa_strategies.md: on random tiny models with uniform-ish attention it need not
beat ``fit``.)

The reference converts one layer at a time for real on a copy of the model: the ORIGINAL model's eager forward gives
each layer's statistics and its output projection's outputs; the copy, with layers before ``i`` already converted,
gets layer ``i``'s ``fit`` (values on the mixed moment), then one whole-model forward of the copy gives the features
the output projection is re-solved on. No layer-by-layer machinery, no temporary assignments.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import output, tiny

import hf_attn_swap.convert.refit as refit_mod
from hf_attn_swap import swap_attention
from hf_attn_swap.convert.adapters import get_adapter
from hf_attn_swap.convert.pooling import convert_projections, rotary_dims_of
from hf_attn_swap.convert.projections import _resolve, build_new_modules, commit, find_attention, read_projections

CALIB = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


@torch.no_grad()
def reference_refit(model, groups: int, calibration: torch.Tensor):
    """A converted copy of ``model`` by the plain statement of ``refit`` (float64 statistics, whole-model forwards)."""
    adapter = get_adapter(model)
    teacher = copy.deepcopy(model)
    teacher.set_attn_implementation("eager")
    sites_t = find_attention(teacher, adapter)
    stats = []  # per layer: (E[x x^T], mixed moment, output projection's outputs)
    for s in sites_t:
        box = {}
        o = _resolve(s.module, s.parent, adapter.o)
        hs = [s.module.register_forward_pre_hook(lambda m, a, k: box.__setitem__("x", k.get("hidden_states", a[0] if a else None)), with_kwargs=True),
              s.module.register_forward_hook(lambda m, a, out: box.__setitem__("p", out[1])),
              o.register_forward_hook(lambda m, a, out: box.__setitem__("y", out))]
        teacher(input_ids=calibration, use_cache=False)
        for h in hs:
            h.remove()
        x = _aug(box["x"].double())  # (b, T, E+1)
        n = x.shape[0] * x.shape[1]
        cov = torch.einsum("bte,btf->ef", x, x) / n
        mixed = torch.einsum("bhij,bje->bhie", box["p"].double(), x)
        mixed = torch.einsum("bhie,bhif->ef", mixed, mixed) / mixed.shape[1] / n
        stats.append((cov, mixed, box["y"].double().reshape(n, -1)))
    student = copy.deepcopy(model)
    student.set_attn_implementation("eager")
    for i, s in enumerate(find_attention(student, adapter)):
        p = read_projections(s.module, s.parent, adapter, head_dim=s.head_dim)
        new = convert_projections(p, num_heads=s.num_heads, old_kv=s.num_kv_heads, new_kv=groups, head_dim=s.head_dim,
                                  strategy="refit", rotary_dims=rotary_dims_of(student.config, s.head_dim, adapter.rope),
                                  qk_norm=adapter.qk_norm, covariance=stats[i][0], value_covariance=stats[i][1])
        # GQA is MHA with each merged K/V head repeated for its group: the reference keeps the copy in that form,
        # which plain eager attention runs in every family (BERT's and GPT-2's eager cannot run fewer K/V heads).
        r, d = s.num_kv_heads // groups, s.head_dim
        def rep(t):
            return None if t is None else t.reshape(groups, 1, d, *t.shape[1:]).expand(
                groups, r, d, *t.shape[1:]).reshape(groups * r * d, *t.shape[1:])

        commit([build_new_modules(s, adapter, new.replace(k_w=rep(new.k_w), k_b=rep(new.k_b), v_w=rep(new.v_w),
                                                           v_b=rep(new.v_b)))])
        o = _resolve(s.module, s.parent, adapter.o)
        box = {}
        h = o.register_forward_pre_hook(lambda m, a: box.__setitem__("f", a[0]))
        student(input_ids=calibration, use_cache=False)
        h.remove()
        f = box["f"].double().reshape(-1, box["f"].shape[-1])
        if o.bias is not None:
            f = _aug(f)
        g, y = f.T @ f, stats[i][2]
        lam = refit_mod.RIDGE_SCALE * g.shape[0] / f.shape[0] * g.diagonal().mean()
        w = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), f.T @ y)
        if o.bias is not None:
            o.bias.copy_(w[-1])
            w = w[:-1]
        o.weight.copy_(w if adapter.layout == "conv1d" else w.T)
    return student


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox", "bert"])
def test_refit_matches_its_plain_reference(arch, groups):
    model = tiny(arch)
    ref = reference_refit(model, groups, CALIB)
    fast = copy.deepcopy(model)
    swap_attention(fast, "gqa", groups=groups, strategy="refit", calibration=CALIB)
    torch.testing.assert_close(output(fast, IDS), output(ref, IDS), atol=2e-5, rtol=1e-4)  # fp32 vs float64 stats
    for a, b in zip(find_attention(fast, get_adapter(fast)), find_attention(ref, get_adapter(ref))):
        ao, bo = (_resolve(s.module, s.parent, get_adapter(model).o).weight for s in (a, b))
        torch.testing.assert_close(ao, bo, atol=1e-5, rtol=1e-4)


def test_refit_of_a_bfloat16_model_runs_its_layers_in_float32_and_lands_on_the_float32_result():
    model = tiny("llama")
    f32 = copy.deepcopy(model)
    swap_attention(f32, "mqa", strategy="refit", calibration=CALIB)
    b16 = copy.deepcopy(model).to(torch.bfloat16)
    swap_attention(b16, "mqa", strategy="refit", calibration=CALIB)
    assert all(p.dtype == torch.bfloat16 for p in b16.parameters())
    for pa, pb in zip(f32.parameters(), b16.parameters()):
        torch.testing.assert_close(pb.float(), pa, atol=2e-2, rtol=2e-2)  # bf16 storage of the same solution
    assert b16.config._attn_implementation == f32.config._attn_implementation


def test_failure_halfway_through_refit_leaves_the_model_as_it_was(monkeypatch):
    """The second layer's output regression fails (its K/V/Q/O applied, hooks set, eager attention on): every
    temporary change is undone and the first layer's finished result is never written."""
    model = tiny("llama")
    pristine = copy.deepcopy(model)
    impl = model.config._attn_implementation
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = refit_mod.refit_output

    def fails_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in layer 1's regression")
        return real(*args, **kwargs)

    monkeypatch.setattr(refit_mod, "refit_output", fails_second)
    with pytest.raises(RuntimeError, match="injected failure"):
        swap_attention(model, "mqa", strategy="refit", calibration=CALIB)
    assert calls["n"] == 2
    assert model.config._attn_implementation == impl
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(output(model, IDS), output(pristine, IDS), atol=0, rtol=0)


def test_refit_refuses_a_model_running_a_non_stock_attention():
    model = tiny("llama")
    swap_attention(model, "sliding_window", window=4, layers=[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="eager attention.*convert the unconverted model"):
        swap_attention(model, "mqa", strategy="refit", calibration=CALIB, layers=[1])
    assert model.config._attn_implementation == impl
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
