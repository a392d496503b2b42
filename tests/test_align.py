"""Strategy ``align``: Procrustes head alignment before mean-pooling (hf_attn_swap/convert/align.py).

The batched code is held to a plain per-head reference written from the activations themselves; the exactness facts
(rotation before pooling changes nothing, also under RoPE; rotated copies of one head pool back exactly) are checked
on tiny real transformers models, each with a control that shows the check would catch the failure it is about.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import output, tiny

import hf_attn_swap.convert.align as align_mod
from hf_attn_swap import kv_heads_per_layer, swap_attention, swap_record
from hf_attn_swap.convert.adapters import get_adapter
from hf_attn_swap.convert.align import ALIGN_ROUNDS, align_projections, nearest_rotations
from hf_attn_swap.convert.calibrate import second_moments
from hf_attn_swap.convert.pooling import rotary_dims_of
from hf_attn_swap.convert.projections import Projections, build_new_modules, commit, find_attention, read_projections

IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(1))


# --- a plain reference: loops over groups and heads, activations instead of second moments, SVD per pair --------------


def _kabsch(cross: torch.Tensor, proper: bool) -> torch.Tensor:
    """argmax_A trace(A cross^T) over orthogonal A (rotations only when ``proper``), by one SVD."""
    u, _, vh = torch.linalg.svd(cross)
    if proper and torch.det(u @ vh) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
    return u @ vh


def _reference_rotation(k_ref: torch.Tensor, k_j: torch.Tensor, rotary_dims: int) -> torch.Tensor:
    """Rotation of head activations ``k_j (n, d)`` onto ``k_ref (n, d)``: a proper 2x2 rotation per RoPE pair, a full
    orthogonal Procrustes solution on the other dims."""
    n, d = k_j.shape
    cross = k_ref.T @ k_j / n
    a = torch.zeros(d, d, dtype=cross.dtype)
    half = rotary_dims // 2
    for i in range(half):
        idx = torch.tensor([i, i + half])
        a[idx[:, None], idx] = _kabsch(cross[idx[:, None], idx], proper=True)
    if rotary_dims < d:
        a[rotary_dims:, rotary_dims:] = _kabsch(cross[rotary_dims:, rotary_dims:], proper=False)
    return a


def _reference_group_rotations(acts: list[torch.Tensor], rotary_dims: int) -> list[torch.Tensor]:
    """Generalised Procrustes on one group's head activations: first head, then the aligned mean, as reference."""
    ref = acts[0]
    for _ in range(ALIGN_ROUNDS):
        rots = [_reference_rotation(ref, k, rotary_dims) for k in acts]
        ref = sum(k @ a.T for k, a in zip(acts, rots)) / len(acts)
    return rots


def reference_align(p: Projections, x: torch.Tensor, *, num_heads: int, old_kv: int, new_kv: int, head_dim: int,
                    rotary_dims: int) -> Projections:
    """What :func:`align_projections` must return, one head at a time, from the activations ``x (n, E)``."""
    d, r, qpk = head_dim, old_kv // new_kv, num_heads // old_kv
    f = {k: None if v is None else v.double() for k, v in vars(p).items()}
    xd = x.double()
    out = {k: None if v is None else v.clone() for k, v in f.items()}
    for g in range(new_kv):
        for name, bias, rot_dims, readers in (("k_w", "k_b", rotary_dims, "q"), ("v_w", "v_b", 0, "o")):
            heads = range(g * r, (g + 1) * r)
            acts = []
            for j in heads:
                rows = slice(j * d, (j + 1) * d)
                acts.append(xd @ f[name][rows].T + (0 if f[bias] is None else f[bias][rows]))
            for j, a in zip(heads, _reference_group_rotations(acts, rot_dims)):
                rows = slice(j * d, (j + 1) * d)
                out[name][rows] = a @ f[name][rows]
                if f[bias] is not None:
                    out[bias][rows] = a @ f[bias][rows]
                for h in range(j * qpk, (j + 1) * qpk):
                    hr = slice(h * d, (h + 1) * d)
                    if readers == "q":
                        out["q_w"][hr] = a @ f["q_w"][hr]
                        if f["q_b"] is not None:
                            out["q_b"][hr] = a @ f["q_b"][hr]
                    else:
                        out["o_w"][:, hr] = f["o_w"][:, hr] @ a.T
    return Projections(**{k: None if v is None else v.to(p.k_w.dtype) for k, v in out.items()})


def _random_projections(gen, *, num_heads, old_kv, d, e, bias, dtype) -> Projections:
    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])).to(dtype)

    return Projections(
        q_w=rnd(num_heads * d, e), q_b=rnd(num_heads * d) if bias else None,
        k_w=rnd(old_kv * d, e), k_b=rnd(old_kv * d) if bias else None,
        v_w=rnd(old_kv * d, e), v_b=rnd(old_kv * d) if bias else None,
        o_w=rnd(e, num_heads * d), o_b=None,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dims", [0, 4, 8])  # no RoPE, partial (pairs + plain dims), full
@pytest.mark.parametrize("old_kv,new_kv,bias", [(4, 1, False), (4, 2, True), (6, 3, False)])
def test_batched_alignment_matches_the_plain_reference(dtype, rotary_dims, old_kv, new_kv, bias):
    gen = torch.Generator().manual_seed(old_kv * 10 + rotary_dims)
    num_heads, d, e, n = old_kv * 2, 8, 24, 400
    p = _random_projections(gen, num_heads=num_heads, old_kv=old_kv, d=d, e=e, bias=bias, dtype=dtype)
    # Correlated inputs, so that the second moment is far from the identity.
    x = (torch.randn(n, e, generator=gen, dtype=torch.float64) @ torch.randn(e, e, generator=gen, dtype=torch.float64))
    x = x.to(dtype)
    xa = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    cov = xa.T @ xa / n
    kw = dict(num_heads=num_heads, old_kv=old_kv, new_kv=new_kv, head_dim=d, rotary_dims=rotary_dims)
    got = align_projections(p, qk_norm=False, covariance=cov, **kw)
    want = reference_align(p, x, **kw)
    for name in ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w"):
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == getattr(p, name).shape, name
        # Both compute in float64 from the same inputs; bfloat16 results may differ by one rounding step.
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
        torch.testing.assert_close(g, w, **tol, msg=name)
    # The alignment really rotated something (a copy of the input would pass the shape checks above).
    assert not torch.allclose(got.k_w.double(), p.k_w.double(), atol=1e-2)


def _rope(d: int, rotary_dims: int, angle: torch.Tensor) -> torch.Tensor:
    """The rotary rotation (rotate_half layout) for one position: ``angle`` per frequency pair."""
    m = torch.eye(d, dtype=torch.float64)
    half = rotary_dims // 2
    a = torch.arange(half)
    m[a, a], m[a + half, a + half] = angle.cos(), angle.cos()
    m[a, a + half], m[a + half, a] = -angle.sin(), angle.sin()
    return m


@pytest.mark.parametrize("rotary_dims", [4, 8])
def test_key_rotations_are_orthogonal_and_commute_with_rope(rotary_dims):
    gen = torch.Generator().manual_seed(3)
    cross = torch.randn(5, 8, 8, generator=gen, dtype=torch.float64)
    rot = nearest_rotations(cross, rotary_dims)
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(rot @ rot.mT, eye.expand_as(rot), atol=1e-12, rtol=0)
    for _ in range(4):
        rope = _rope(8, rotary_dims, torch.rand(rotary_dims // 2, generator=gen, dtype=torch.float64) * 20)
        torch.testing.assert_close(rot @ rope, rope @ rot, atol=1e-12, rtol=0)
    # Control: an unrestricted Procrustes solution (what ignoring RoPE would give) does not commute.
    free = nearest_rotations(cross, 0)
    assert not torch.allclose(free @ rope, rope @ free, atol=1e-3)


def _site_moments(model):
    adapter = get_adapter(model)
    sites = find_attention(model, adapter)
    moments, _ = second_moments(model, [s.module for s in sites], CALIB)
    return adapter, sites, moments


def _first_layer(model) -> Projections:
    """Layer 0's canonical projections (copies)."""
    adapter = get_adapter(model)
    site = find_attention(model, adapter)[0]
    p = read_projections(site.module, site.parent, adapter, head_dim=site.head_dim)
    return p.replace(**{k: None if v is None else v.detach().clone() for k, v in vars(p).items()})


def _rotate_in_place(model, new_kv_of, *, ignore_rope: bool = False) -> None:
    """Apply :func:`align_projections` to every layer WITHOUT pooling (the model keeps its KV heads)."""
    adapter, sites, moments = _site_moments(model)
    blocks = []
    for site, cov in zip(sites, moments):
        p = read_projections(site.module, site.parent, adapter, head_dim=site.head_dim)
        rot = 0 if ignore_rope else rotary_dims_of(model.config, site.head_dim, adapter.rope)
        new = align_projections(p, num_heads=site.num_heads, old_kv=site.num_kv_heads, new_kv=new_kv_of(site),
                                head_dim=site.head_dim, rotary_dims=rot, qk_norm=adapter.qk_norm, covariance=cov)
        blocks.append(build_new_modules(site, adapter, new))
    commit(blocks)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2", "gpt2", "bert"])
def test_rotation_before_pooling_changes_nothing(arch):
    """q.k and O.V are invariant under the rotations, with RoPE (full in llama/qwen2, partial in gpt_neox) too."""
    model = tiny(arch)
    ref = output(model, IDS).detach()
    k_before = _first_layer(model).k_w
    _rotate_in_place(model, lambda s: 1)
    assert not torch.allclose(_first_layer(model).k_w, k_before, atol=1e-2)  # something was rotated
    torch.testing.assert_close(output(model, IDS).detach(), ref, atol=1e-5, rtol=1e-5)


def test_rope_blind_rotation_would_change_the_model():
    """Control for the test above: rotations that ignore RoPE's pairs change a llama's outputs."""
    model = tiny("llama")
    ref = output(model, IDS).detach()
    _rotate_in_place(model, lambda s: 1, ignore_rope=True)
    assert (output(model, IDS).detach() - ref).abs().max() > 1e-3


def _random_rope_rotation(gen, d: int, rotary_dims: int) -> torch.Tensor:
    """A random orthogonal map that commutes with RoPE: a rotation per pair, any orthogonal map on the plain dims."""
    m = _rope(d, rotary_dims, torch.rand(rotary_dims // 2, generator=gen, dtype=torch.float64) * 2 * math.pi)
    if rotary_dims < d:
        q, _ = torch.linalg.qr(torch.randn(d - rotary_dims, d - rotary_dims, generator=gen, dtype=torch.float64))
        m[rotary_dims:, rotary_dims:] = q
    return m


def _rotated_copies(arch: str):
    """A tiny model whose KV heads come in pairs: head 2g+1 is head 2g rotated (keys by a RoPE-commuting map,
    values by any orthogonal one), biases included. Merging each pair is lossless after alignment, not before."""
    model = tiny(arch)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(7)
    blocks = []
    for site in find_attention(model, adapter):
        d, kv = site.head_dim, site.num_kv_heads
        rot = rotary_dims_of(model.config, d, adapter.rope)
        p = read_projections(site.module, site.parent, adapter, head_dim=d)

        def copies(w, b, rot_dims):
            w2 = w.double().reshape(kv, d, -1).clone()
            b2 = None if b is None else b.double().reshape(kv, d).clone()
            for j in range(1, kv, 2):
                m = _random_rope_rotation(gen, d, rot_dims)
                w2[j] = m @ w2[j - 1]
                if b2 is not None:
                    b2[j] = m @ b2[j - 1]
            return w2.reshape(w.shape).to(w.dtype), None if b2 is None else b2.reshape(b.shape).to(b.dtype)

        k_w, k_b = copies(p.k_w, p.k_b, rot)
        v_w, v_b = copies(p.v_w, p.v_b, 0)
        blocks.append(build_new_modules(site, adapter, p.replace(k_w=k_w, k_b=k_b, v_w=v_w, v_b=v_b)))
    commit(blocks)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2", "bert"])
def test_rotated_copies_of_a_head_pool_back_exactly(arch):
    model = _rotated_copies(arch)
    kv = kv_heads_per_layer(model)[0]
    ref = output(model, IDS).detach()
    errs = {}
    for strategy in ("mean", "align"):
        m = copy.deepcopy(model)
        swap_attention(m, "gqa", groups=kv // 2, strategy=strategy, calibration=CALIB)
        assert kv_heads_per_layer(m) == [kv // 2] * 2
        errs[strategy] = (output(m, IDS).detach() - ref).abs().max().item()
    assert errs["align"] < 1e-5, errs
    assert errs["mean"] > 1e-2, errs  # control: without alignment the same merge loses a lot


def test_align_then_fit_is_fit():
    """Why there is no "align + fit" strategy: the fit's optimum does not move when the heads are rotated first."""
    fitted = tiny("llama")
    aligned = tiny("llama")
    _rotate_in_place(aligned, lambda s: 1)
    for m in (fitted, aligned):
        swap_attention(m, "mqa", strategy="fit", calibration=CALIB)
    torch.testing.assert_close(output(aligned, IDS), output(fitted, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox", "bert"])
def test_align_beats_mean_on_random_weights(arch):
    ref_model = tiny(arch)
    ref = output(ref_model, IDS).detach()
    errs = {}
    for strategy in ("mean", "align"):
        model = copy.deepcopy(ref_model)
        swap_attention(model, "gqa", groups=1, strategy=strategy, calibration=CALIB)
        errs[strategy] = (output(model, IDS).detach() - ref).pow(2).mean().item()
    assert errs["align"] < errs["mean"], errs


def test_qk_norm_keys_are_mean_pooled_values_aligned():
    """Qwen3 normalises keys after k_proj: keys are left unrotated (the norm's gain does not commute with a rotation),
    values are still aligned, and the unpooled model is unchanged."""
    model = tiny("qwen3")
    ref = output(model, IDS).detach()
    before = _first_layer(model)
    _rotate_in_place(model, lambda s: 1)
    after = _first_layer(model)
    assert torch.equal(after.k_w, before.k_w) and torch.equal(after.q_w, before.q_w)
    assert not torch.allclose(after.v_w, before.v_w, atol=1e-2)
    torch.testing.assert_close(output(model, IDS).detach(), ref, atol=1e-5, rtol=1e-5)


# --- bad input and failures leave the model as it was -----------------------------------------------------------------


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config._attn_implementation == "sdpa"
    assert swap_record(model) is None
    assert kv_heads_per_layer(model) == [4, 4]


def test_align_without_calibration_is_one_clear_error():
    model = tiny("llama")
    before = _state(model)
    with pytest.raises(ValueError, match='"strategy": "align"} needs calibration text: pass calibration='):
        swap_attention(model, "gqa", groups=2, strategy="align")
    _assert_unchanged(model, before)


def test_unknown_strategy_lists_align():
    model = tiny("llama")
    before = _state(model)
    with pytest.raises(ValueError, match="allowed: mean, first, random, fit, align, refit$"):
        swap_attention(model, "mqa", strategy="procrustes", calibration=CALIB)
    _assert_unchanged(model, before)


def test_failure_inside_the_alignment_leaves_the_model_untouched(monkeypatch):
    """The second layer's alignment raises after the first layer was aligned: nothing may have been written."""
    model = tiny("llama")
    before, ref = _state(model), output(model, IDS).detach()
    real, calls = align_mod.nearest_rotations, {"n": 0}

    def flaky(cross, rotary_dims):
        calls["n"] += 1
        if calls["n"] > ALIGN_ROUNDS * 2:  # keys and values of layer 0 are done
            raise RuntimeError("injected failure in layer 1's alignment")
        return real(cross, rotary_dims)

    monkeypatch.setattr(align_mod, "nearest_rotations", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        swap_attention(model, "gqa", groups=2, strategy="align", calibration=CALIB)
    assert calls["n"] > ALIGN_ROUNDS * 2
    _assert_unchanged(model, before)
    assert torch.equal(output(model, IDS).detach(), ref)


# --- real weights -------------------------------------------------------------------------------------------------------


@pytest.mark.real
def test_smollm2_align_beats_mean_on_held_out_perplexity(smollm2):
    from hf_attn_swap.data import load_text, token_blocks, tokenize
    from hf_attn_swap.eval.perplexity import perplexity

    model, tok = smollm2
    ids = tokenize(tok, load_text("shakespeare", split="validation"), max_tokens=1024)
    calib = token_blocks(tok, load_text("shakespeare", split="train"), 512, max_tokens=2048)
    base = perplexity(model, ids, context=512).token_ppl
    ppl = {}
    for strategy in ("mean", "align"):
        m = copy.deepcopy(model)
        swap_attention(m, "mqa", strategy=strategy, calibration=calib)
        ppl[strategy] = perplexity(m, ids, context=512).token_ppl
        del m
    assert math.isfinite(ppl["align"]) and ppl["align"] > base, (ppl, base)
    assert ppl["align"] < ppl["mean"], ppl
