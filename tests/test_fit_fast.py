"""The fast ``fit`` (convert/fit.py) against its plain reference (pooling._fit), and the memory-bounding parts of
calibration (batches, the heap handed back per layer, a failing layer fit rolled back)."""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from hf_attn_swap import swap_attention
from hf_attn_swap.convert import calibrate, pooling
from hf_attn_swap.convert.fit import fit_projections
from hf_attn_swap.convert.projections import Projections
from tiny_models import output, tiny

CALIB = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _problem(e=40, heads=8, kv=4, d=8, bias=False, v_bias=False, tokens=400, dtype=torch.float64, seed=0):
    """Random projections and the second moment of anisotropic, off-centre activations (with the constant 1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = rnd(tokens, e) * (3 * torch.rand(e, generator=g, dtype=torch.float64)) + rnd(e)
    x = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    cov = x.T @ x / tokens
    t = lambda *s: rnd(*s).to(dtype)  # noqa: E731
    p = Projections(t(heads * d, e), t(heads * d) if bias else None, t(kv * d, e), t(kv * d) if bias else None,
                    t(kv * d, e), t(kv * d) if bias or v_bias else None, t(e, heads * d), t(e) if bias else None)
    return p, cov


def _forms(p: Projections, heads: int, kv: int, d: int, rd: int):
    """What the model computes from the projections, independent of how a head's basis is chosen: per query head,
    each RoPE pair's complex form ``conj(q_pair)^T k_pair`` (rotation-invariant), the plain dims' ``Q^T K``, and
    ``O_h V``; biases as a last input column (float64)."""
    q = p.q_w.double().reshape(heads, d, -1)
    k = p.k_w.double().reshape(kv, d, -1)
    if p.q_b is not None and p.k_b is not None:
        q = torch.cat([q, p.q_b.double().reshape(heads, d, 1)], -1)
        k = torch.cat([k, p.k_b.double().reshape(kv, d, 1)], -1)
    v = p.v_w.double().reshape(kv, d, -1)
    if p.v_b is not None:
        v = torch.cat([v, p.v_b.double().reshape(kv, d, 1)], -1)
    o = p.o_w.double().reshape(p.o_w.shape[0], heads, d).permute(1, 0, 2)
    owner = torch.arange(heads) // (heads // kv)
    h = rd // 2
    qc, kc = torch.complex(q[:, :h], q[:, h:rd]), torch.complex(k[:, :h], k[:, h:rd])[owner]
    return qc.conj()[..., :, None] * kc[..., None, :], q[:, rd:].mT @ k[owner][:, rd:], o @ v[owner]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance; the plain distance where ``b`` is empty or zero (no plain dims)."""
    scale = b.norm()
    return float((a - b).norm() / scale) if scale > 0 else float((a - b).norm())


CASES = {  # e, heads, kv, new_kv, d, rotary dims, q/k/v biases, v bias only, qk_norm
    "mqa_rope": dict(kv=4, new=1, rd=8),
    "gqa_rope": dict(kv=4, new=2, rd=8),
    "mha_to_gqa": dict(kv=8, new=2, rd=8),
    "biases_qwen2": dict(kv=4, new=1, rd=8, bias=True),
    "v_bias_only": dict(kv=4, new=2, rd=8, v_bias=True),
    "partial_rotary_neox": dict(kv=8, new=2, rd=4, bias=True),
    "no_rope_gpt2": dict(kv=8, new=1, rd=0, bias=True),
    "qk_norm_qwen3": dict(kv=4, new=1, rd=8, qk_norm=True),
}


def _both(case: dict, dtype=torch.float64, tokens=400):
    p, cov = _problem(kv=case["kv"], bias=case.get("bias", False), v_bias=case.get("v_bias", False), dtype=dtype,
                      tokens=tokens)
    args = (8, case["kv"], case["new"], 8, case["rd"], case.get("qk_norm", False), cov)
    return p, cov, pooling._fit(p, *args), fit_projections(p, *args)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_fit_computes_the_reference_forms_to_float64_roundoff(name):
    case = CASES[name]
    p, _, ref, new = _both(case)
    for field in ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w", "o_b"):
        a, b = getattr(ref, field), getattr(new, field)
        assert (a is None) == (b is None), field
        assert a is None or (a.shape == b.shape and a.dtype == b.dtype == torch.float64), field
    for a, b in zip(_forms(new, 8, case["new"], 8, case["rd"]), _forms(ref, 8, case["new"], 8, case["rd"])):
        assert _rel(a, b) < 1e-11
    if case.get("qk_norm"):  # keys mean-pooled, queries untouched, as in the reference
        assert torch.equal(new.q_w, p.q_w) and torch.allclose(new.k_w, ref.k_w, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["mqa_rope", "biases_qwen2", "no_rope_gpt2"])
def test_values_fitted_on_another_statistic_match_the_reference(name):
    """refit's value statistic (the attention-mixed inputs' moment) reaches the values only, in both paths."""
    case = CASES[name]
    p, cov = _problem(kv=case["kv"], bias=case.get("bias", False), tokens=400)
    p2, vcov = _problem(kv=case["kv"], bias=case.get("bias", False), tokens=300, seed=7)  # a different moment
    args = (8, case["kv"], case["new"], 8, case["rd"], False, cov)
    ref, new, plain = pooling._fit(p, *args, vcov), fit_projections(p, *args, vcov), fit_projections(p, *args)
    for a, b in zip(_forms(new, 8, case["new"], 8, case["rd"]), _forms(ref, 8, case["new"], 8, case["rd"])):
        assert _rel(a, b) < 1e-10
    # keys/queries as plain fit's; values/outputs differ from it
    assert torch.equal(new.k_w, plain.k_w) and torch.equal(new.q_w, plain.q_w)
    assert _rel(_forms(new, 8, case["new"], 8, case["rd"])[2], _forms(plain, 8, case["new"], 8, case["rd"])[2]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["mqa_rope", "biases_qwen2", "partial_rotary_neox"])
def test_fast_fit_in_low_precision_is_as_close_to_the_exact_forms_as_the_reference(name, dtype):
    """Stored in float32/bfloat16, both paths round their float64 solution once; the bases they store may differ by
    a rotation (see convert/fit.py), so each is held to the exact float64 forms: the new one's error is at most the
    reference's rounding error (times 1.5 and plus 2 ulps of float32 for ties)."""
    case = CASES[name]
    _, _, exact, _ = _both(case)
    _, _, ref, new = _both(case, dtype=dtype)
    assert new.q_w.dtype == new.k_w.dtype == new.v_w.dtype == new.o_w.dtype == dtype
    truth = _forms(exact, 8, case["new"], 8, case["rd"])
    for t, a, b in zip(truth, _forms(new, 8, case["new"], 8, case["rd"]), _forms(ref, 8, case["new"], 8, case["rd"])):
        assert _rel(a, t) <= 1.5 * _rel(b, t) + 2.5e-7
        assert _rel(a, t) < (1e-6 if dtype == torch.float32 else 2e-2)


def _objective(p: Projections, orig: Projections, cov: torch.Tensor, heads: int, old_kv: int, new_kv: int,
               rd: int) -> float:
    """The fit's objective on ``cov``: squared error of every form in the activations' metric."""
    n = cov.shape[0] if p.q_b is not None else cov.shape[0] - 1
    c = cov[:n, :n]
    err = 0.0
    for new_form, old_form in zip(_forms(p, heads, new_kv, 8, rd)[:2], _forms(orig, heads, old_kv, 8, rd)[:2]):
        delta = (new_form - old_form).to(torch.complex128)
        err += float(torch.einsum("ab,...bc,cd,...ad->", c.to(delta.dtype), delta, c.to(delta.dtype),
                                  delta.conj()).real)
    cv = cov[: p.v_w.shape[1] + (p.v_b is not None), : p.v_w.shape[1] + (p.v_b is not None)]
    dv = _forms(p, heads, new_kv, 8, rd)[2] - _forms(orig, heads, old_kv, 8, rd)[2]
    return err + float(torch.einsum("hab,bc,hac->", dv, cv, dv))


@pytest.mark.parametrize("name", ["mqa_rope", "biases_qwen2", "no_rope_gpt2"])
def test_with_fewer_tokens_than_dims_the_fast_fit_is_no_worse_and_within_the_reference_floor(name):
    """30 tokens, 40 dims: the second moment is singular, where the reference floored its eigenvalues at 1e-6 of the
    largest before inverting a root. Nothing is inverted in the fast path, so it solves the unfloored problem: its
    objective is at most the reference's, and its forms differ from the reference's by about the floor."""
    case = CASES[name]
    p, cov, ref, new = _both(case, tokens=30)
    assert torch.linalg.matrix_rank(cov).item() <= 31 < cov.shape[0]
    assert _objective(new, p, cov, 8, case["kv"], case["new"], case["rd"]) <= (
        _objective(ref, p, cov, 8, case["kv"], case["new"], case["rd"]) * (1 + 1e-9))
    for a, b in zip(_forms(new, 8, case["new"], 8, case["rd"]), _forms(ref, 8, case["new"], 8, case["rd"])):
        assert _rel(a, b) < 1e-3


def test_duplicated_rope_heads_come_back_as_themselves_scaled():
    """Each new RoPE pair is oriented towards the mean of the pairs it replaces: heads that are copies of one head
    come back as that head (times a positive scale per pair), not rotated by an arbitrary phase."""
    p, cov = _problem(kv=4)
    k = p.k_w.reshape(4, 8, -1)[::2, None].expand(2, 2, 8, -1).reshape(32, -1)  # heads 1 and 3 copies of 0 and 2
    new = fit_projections(p.replace(k_w=k), 8, 4, 2, 8, 8, False, cov)
    old = k.reshape(4, 8, -1)[::2]
    for g in range(2):
        for i in range(4):  # pair (i, i + 4): a positive multiple of the original pair
            a = torch.stack([new.k_w.reshape(2, 8, -1)[g, i], new.k_w.reshape(2, 8, -1)[g, i + 4]])
            b = torch.stack([old[g, i], old[g, i + 4]])
            scale = (a * b).sum() / (b * b).sum()
            assert scale > 0
            torch.testing.assert_close(a, scale * b, rtol=1e-9, atol=1e-12)


def test_fast_fit_decomposes_nothing_of_the_calibration_size(monkeypatch):
    """The speed comes from never factorising C (the reference's eigh of an n x n matrix and its two roots): only the
    small per-group Grams (r x r for pairs, r*D square otherwise) are decomposed."""
    p, cov = _problem(e=40, kv=8)
    sizes = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *k, **kw: sizes.append(a.shape[-1]) or real(a, *k, **kw))
    fit_projections(p, 8, 8, 2, 8, 4, False, cov)
    assert sizes and max(sizes) <= 4 * 8 < cov.shape[0]
    sizes.clear()
    pooling._fit(p, 8, 8, 2, 8, 4, False, cov)
    assert max(sizes) == cov.shape[0] - 1  # what the reference does (the check above can fail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_converted_model_computes_what_the_reference_conversion_computes(arch, dtype, monkeypatch):
    """Whole conversion through swap_attention, fast path against the reference path (same calibration): the
    converted models' outputs agree to the precision the weights are stored in."""
    base = tiny(arch).to(dtype)
    fast, ref = copy.deepcopy(base), copy.deepcopy(base)
    swap_attention(fast, "gqa", groups=1, strategy="fit", calibration=CALIB)
    monkeypatch.setattr(pooling, "fit_projections", pooling._fit)
    swap_attention(ref, "gqa", groups=1, strategy="fit", calibration=CALIB)
    with torch.no_grad():
        a, b, orig = output(fast, IDS).float(), output(ref, IDS).float(), output(base, IDS).float()
    # float32: round-off only. bfloat16: a fraction of what the conversion itself changes, rounding included.
    tol = 1e-5 if dtype == torch.float32 else 0.1 * _rel(b, orig)
    assert _rel(a, b) < tol, (_rel(a, b), _rel(b, orig))


@pytest.mark.parametrize("fail_at", [0, 1])
def test_a_layer_fit_that_fails_leaves_the_model_exactly_as_it_was(fail_at, monkeypatch):
    """Each layer is fitted as soon as its statistic is ready (layer 1's forward runs after layer 0's fit). A fit
    that raises at layer k, earlier layers already fitted, leaves weights, config, hooks and outputs as they were."""
    model = tiny("llama")
    before, logits = {k: v.clone() for k, v in model.state_dict().items()}, output(model, IDS)
    params = {n: p for n, p in model.named_parameters()}
    calls = []
    real = pooling.fit_projections

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at + 1:
            raise RuntimeError("injected fit failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pooling, "fit_projections", failing)
    with pytest.raises(RuntimeError, match="injected fit failure"):
        swap_attention(model, "gqa", groups=2, strategy="fit", calibration=CALIB)
    assert len(calls) == fail_at + 1
    assert model.config.num_key_value_heads == 4
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in model.model.layers)
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors, not copies
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert all(m.self_attn._forward_pre_hooks == {} for m in model.model.layers)
    assert torch.equal(output(model, IDS), logits)


@pytest.mark.parametrize("shape,want", [((4, 512), [1, 1, 1, 1]), ((5, 24), [5]), ((50, 24), [21, 21, 8]),
                                        ((2, 2048), [1, 1])])
def test_tensor_calibration_runs_in_batches_of_at_most_batch_tokens(shape, want):
    """Whole rows, at most BATCH_TOKENS tokens a batch (a longer row alone): a batch's activations are what
    calibration holds beyond the carried hidden states."""
    batches = list(calibrate._as_batches(torch.zeros(shape, dtype=torch.long)))
    assert [b["input_ids"].shape[0] for b in batches] == want
    assert all(b["input_ids"].shape[1] == shape[1] for b in batches)


def test_freed_memory_is_handed_back_after_every_layer(monkeypatch):
    """After each layer (its forward and its fit) the C heap's free pages go back to the OS: glibc's malloc_trim where
    it exists (this Linux), a no-op elsewhere."""
    if platform.libc_ver()[0] == "glibc":
        assert calibrate._malloc_trim() is not None  # else the per-layer trim would silently do nothing
    trims = []
    monkeypatch.setattr(calibrate, "return_freed_memory", lambda: trims.append(1))
    model = tiny("llama")
    swap_attention(model, "gqa", groups=2, strategy="fit", calibration=CALIB)
    assert len(trims) == len(model.model.layers)
