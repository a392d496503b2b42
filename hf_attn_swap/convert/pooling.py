"""Pure tensor surgery: merge groups of K/V heads into fewer heads.

Strategies (``new_kv`` KV heads, each merging ``r = old_kv // new_kv`` neighbouring heads):

- ``mean``: average the K and V projection rows of each group (Ainslie et al. 2023).
- ``first``: keep the first head of each group (the paper's ablation).
- ``random``: fresh random K/V projections with the original weights' standard deviation (the paper's "random init"
  ablation; seeded).
- ``fit``: calibrated joint refit, this package's strategy. Attention only ever uses K through the bilinear form
  ``q_i . k_j = x^T Wq_i^T Wk_j x`` and V through the linear map ``Wo_i Wv_j``. For each new KV head we find the shared
  K (resp. V) projection and new per-head Q (resp. O) projections that best approximate all of the group's forms in the
  calibration activations' metric (``E ||(M' - M) x||^2`` with ``x`` the attention input): a small weighted SVD per
  group, closed form, no training. RoPE rotates dims ``(i, i + r/2)`` by position-dependent angles; treating each such
  pair as one complex number makes the form rotation-invariant exactly when the fit is done per pair in complex
  arithmetic, so the result is exact under RoPE for every relative position. Mean pooling (with unchanged Q/O) is one
  point of the feasible set, so in this metric the fit is never worse than ``mean``; lossless inputs (duplicated
  heads) are reproduced exactly. Keys behind a norm (``qk_norm``) are not linear in ``x``: there the keys are
  mean-pooled and only V/O are refit.
- ``align``: rotate each K/V head of a group onto a common reference by orthogonal Procrustes on the calibration
  activations (RoPE-commuting rotations for keys, with the queries and output columns rotated to match, so nothing
  changes before pooling), then ``mean`` (after Jin et al. 2024; see :mod:`.align`).
"""

from __future__ import annotations

import torch

from . import align as _align
from .fit import fit_projections
from .projections import Projections

STRATEGIES = ("mean", "first", "random", "fit", "align", "refit")
#: strategies that read calibration statistics (``covariance=``; ``calibration=`` for swap_attention).
CALIBRATED = ("fit", "align", "refit")


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    """``(n*d, ...)`` -> ``(n, d, ...)``."""
    return w.reshape(n, -1, *w.shape[1:])


def pool(w: torch.Tensor | None, old_kv: int, new_kv: int, strategy: str, generator: torch.Generator | None = None):
    """Pool a K or V projection weight/bias ``(old_kv*d, ...)`` to ``(new_kv*d, ...)`` by ``mean``/``first``/``random``."""
    if w is None:
        return None
    r = old_kv // new_kv
    h = _heads(w, old_kv)
    grouped = h.reshape(new_kv, r, *h.shape[1:])
    if strategy == "mean":
        out = grouped.double().mean(1).to(w.dtype)
    elif strategy == "first":
        out = grouped[:, 0]
    elif strategy == "random":
        std = w.float().std() if w.numel() > 1 else torch.tensor(0.02)
        out = (torch.randn(grouped[:, 0].shape, generator=generator, dtype=torch.float32) * std).to(w.dtype)
        if w.dim() == 1:  # biases start at zero, as in a fresh init
            out = torch.zeros_like(out)
    else:
        raise ValueError(f"unknown pooling strategy {strategy!r}; known strategies: {', '.join(STRATEGIES)}")
    return out.reshape(new_kv * h.shape[1], *w.shape[1:]).contiguous()


def _sqrt_and_inv_sqrt(c: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(c)
    # A relative ridge keeps directions the calibration text never visited from blowing up the inverse.
    evals = evals.clamp_min(eps * evals.max().clamp_min(1e-30))
    return (evecs * evals.sqrt()) @ evecs.mT, (evecs * evals.rsqrt()) @ evecs.mT


def fit_bilinear(
    lefts: torch.Tensor,
    rights: torch.Tensor,
    assign: list[int],
    c_left: torch.Tensor | None,
    right_roots: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best shared right factor for a group of bilinear forms ``left_i^T right_{assign[i]}`` (batched over ``P``).

    Minimises ``sum_i E || (L_i'^T R' - L_i^T R_{a(i)}) ||^2`` weighted by ``c_left`` (None = identity) on the left
    and ``C_right`` on the right, over a shared ``R' (D, n)`` and free ``L_i' (D, m)``, independently for each of the
    ``P`` leading problems. Real or complex factors (complex for RoPE pairs, ``D = 1``). Each ``L_i'`` is ``T_j L_i``
    for a ``(D, D)`` matrix ``T_j`` per old head ``j``: the queries (or output columns) are re-mixed, not re-learnt.

    Args:
        lefts: ``(P, nq, D, m)``, one per query (or output) head.
        rights: ``(P, r, D, n)``, one per old KV head of the group.
        assign: for each left, the index into ``rights`` it pairs with.
        c_left: ``(m, m)`` second moment of the left inputs, or None.
        right_roots: square root and inverse square root of the right inputs' second moment ``(n, n)``.

    Returns:
        (new lefts ``(P, nq, D, m)``, new right ``(P, D, n)``), in the inputs' dtype.
    """
    dtype = rights.dtype
    work = torch.complex128 if dtype.is_complex else torch.float64
    p_, r, d, _ = rights.shape
    half, inv_half = (t.to(work) for t in right_roots)
    lw = lefts.to(work)
    weighted = lw if c_left is None else lw @ c_left.to(work)
    per_left = lw.conj() @ weighted.mT  # (P, nq, D, D)
    idx = torch.as_tensor(assign)
    gram = torch.zeros(p_, r, d, d, dtype=work).index_add_(1, idx, per_left)
    # G = R^H R with R upper triangular; a relative ridge for heads whose output is (nearly) dead.
    scale = gram.diagonal(dim1=-2, dim2=-1).real.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-30)
    gram = gram + 1e-9 * scale[..., None] * torch.eye(d, dtype=work)
    r_up = torch.linalg.cholesky(gram).mH  # (P, r, D, D)
    blocks = r_up @ rights.to(work) @ half  # (P, r, D, n)
    u, s, vh = torch.linalg.svd(blocks.reshape(p_, r * d, -1), full_matrices=False)
    u, s, vh = u[..., :d], s[..., :d], vh[..., :d, :]
    root = s.sqrt().to(work)  # (P, D)
    new_right = (root[..., :, None] * vh) @ inv_half
    u_j = u.reshape(p_, r, d, d) * root[:, None, None, :]
    # L_i' = (R_j^{-1} U_j S^{1/2})^T L_i  (plain transpose, also for complex: see module docstring)
    transforms = torch.linalg.solve_triangular(r_up, u_j, upper=True).mT  # (P, r, D, D)
    new_lefts = transforms[:, idx] @ lw
    return new_lefts.to(dtype), new_right.to(dtype)


def _augment(w: torch.Tensor, b: torch.Tensor | None, augmented: bool) -> torch.Tensor:
    if not augmented:
        return w
    return torch.cat([w, (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))[:, None]], 1)


def _split_aug(w: torch.Tensor, augmented: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (w[:, :-1], w[:, -1]) if augmented else (w, None)


def convert_projections(
    p: Projections,
    *,
    num_heads: int,
    old_kv: int,
    new_kv: int,
    head_dim: int,
    strategy: str,
    rotary_dims: int = 0,
    qk_norm: bool = False,
    covariance: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    value_covariance: torch.Tensor | None = None,
) -> Projections:
    """Convert one module's canonical projections from ``old_kv`` to ``new_kv`` KV heads.

    Args:
        p: canonical projections (see :mod:`.projections`).
        num_heads: query heads.
        old_kv, new_kv: KV heads before/after; ``new_kv`` divides ``old_kv``.
        head_dim: per-head size.
        strategy: one of :data:`STRATEGIES`.
        rotary_dims: leading dims of each head that RoPE rotates (pairs ``i, i + rotary_dims/2``); 0 = no RoPE.
        qk_norm: keys pass through a norm after ``k_proj`` (the ``fit`` strategy then mean-pools keys).
        covariance: for ``fit`` and ``align``, the second moment ``E[x x^T]`` of the attention input, ``(E+1, E+1)`` with a trailing
            constant-1 coordinate (used when the projections have biases; otherwise its top-left block is used).
        generator: for ``random``.
        value_covariance: for ``refit``, the statistic its values are fitted on (:mod:`.refit`); same layout.
    """
    if old_kv % new_kv:
        raise ValueError(f"new KV heads ({new_kv}) must divide the current KV heads ({old_kv})")
    if new_kv == old_kv:
        return p  # bit-identical: nothing to merge
    if strategy in CALIBRATED and covariance is None:
        raise ValueError(
            f"strategy {strategy!r} needs calibration activations (pass calibration=... to swap_attention)"
        )
    if strategy == "align":
        p = _align.align_projections(p, num_heads=num_heads, old_kv=old_kv, new_kv=new_kv, head_dim=head_dim,
                                     rotary_dims=rotary_dims, qk_norm=qk_norm, covariance=covariance)
        strategy = "mean"  # the aligned heads are then mean-pooled
    if strategy not in ("fit", "refit"):
        return p.replace(
            k_w=pool(p.k_w, old_kv, new_kv, strategy, generator),
            k_b=pool(p.k_b, old_kv, new_kv, strategy, generator),
            v_w=pool(p.v_w, old_kv, new_kv, strategy, generator),
            v_b=pool(p.v_b, old_kv, new_kv, strategy, generator),
        )
    # refit's output projections are re-solved afterwards, layer by layer (.refit); its K/V/Q/O start is this fit
    return fit_projections(p, num_heads, old_kv, new_kv, head_dim, rotary_dims, qk_norm, covariance,
                           value_covariance if strategy == "refit" else None)


def _fit(p, num_heads, old_kv, new_kv, head_dim, rotary_dims, qk_norm, cov, value_cov=None) -> Projections:
    """The plain reference of ``fit`` (whiten, SVD, un-whiten; per group, complex128 for RoPE pairs).

    :func:`.fit.fit_projections` computes the same solution without the roots of ``C`` and is what conversions run;
    ``tests/test_fit_fast.py`` holds one to the other. Kept because it is the readable statement of the method.
    """
    dtype = p.k_w.dtype
    e = p.k_w.shape[1]
    full = cov.double()
    plain_cov = full[:e, :e]
    r = old_kv // new_kv
    q_per_kv = num_heads // old_kv
    q_heads = _heads(p.q_w.double(), num_heads)  # (H, d, E)
    k_heads = _heads(p.k_w.double(), old_kv)
    v_heads = _heads(p.v_w.double(), old_kv)
    o_heads = p.o_w.double().reshape(p.o_w.shape[0], num_heads, head_dim).permute(1, 2, 0)  # (H, d, E_out)
    qb = None if p.q_b is None else _heads(p.q_b.double(), num_heads)
    kb = None if p.k_b is None else _heads(p.k_b.double(), old_kv)
    vb = None if p.v_b is None else _heads(p.v_b.double(), old_kv)
    aug_k = qb is not None and kb is not None
    aug_v = vb is not None
    c_k = full if aug_k else plain_cov
    vfull = full if value_cov is None else value_cov.double()
    c_v = vfull if aug_v else vfull[:e, :e]
    roots_k = _sqrt_and_inv_sqrt(c_k)
    roots_v = roots_k if aug_v == aug_k and value_cov is None else _sqrt_and_inv_sqrt(c_v)
    c_k_complex = c_k.to(torch.complex128)

    new_q = q_heads.clone()
    new_qb = None if qb is None else qb.clone()
    new_o = o_heads.clone()
    new_k = torch.empty(new_kv, head_dim, e, dtype=torch.float64)
    new_kb = None if kb is None else torch.empty(new_kv, head_dim, dtype=torch.float64)
    new_v = torch.empty_like(new_k)
    new_vb = None if vb is None else torch.empty(new_kv, head_dim, dtype=torch.float64)

    half = rotary_dims // 2
    pairs = [(i, i + half) for i in range(half)]
    plain = list(range(rotary_dims, head_dim))
    for g in range(new_kv):
        olds = list(range(g * r, (g + 1) * r))
        queries = [h for j in olds for h in range(j * q_per_kv, (j + 1) * q_per_kv)]
        assign = [olds.index(h // q_per_kv) for h in queries]

        # ---- keys (and the queries that read them)
        if qk_norm:
            new_k[g] = k_heads[olds].mean(0)
            if kb is not None:
                new_kb[g] = kb[olds].mean(0)
        else:
            qa = {h: _augment(q_heads[h], None if qb is None else qb[h], aug_k) for h in queries}
            ka = [_augment(k_heads[j], None if kb is None else kb[j], aug_k) for j in olds]
            out_k = torch.empty(head_dim, ka[0].shape[1], dtype=torch.float64)
            out_q = {h: torch.empty_like(qa[h]) for h in queries}
            if pairs:
                a_idx, b_idx = torch.arange(half), torch.arange(half) + half
                q_stack = torch.stack([qa[h] for h in queries])  # (nq, d, n)
                k_stack = torch.stack(ka)  # (r, d, n)
                lefts = torch.complex(q_stack[:, a_idx], q_stack[:, b_idx]).conj().permute(1, 0, 2)[:, :, None]
                rights = torch.complex(k_stack[:, a_idx], k_stack[:, b_idx]).permute(1, 0, 2)[:, :, None]
                nl, nr = fit_bilinear(lefts, rights, assign, c_k_complex, roots_k)
                out_k[a_idx], out_k[b_idx] = nr[:, 0].real, nr[:, 0].imag
                qc = nl[:, :, 0].conj()  # (P, nq, n)
                for t, h in enumerate(queries):
                    out_q[h][a_idx], out_q[h][b_idx] = qc[:, t].real, qc[:, t].imag
            if plain:
                nl, nr = fit_bilinear(
                    torch.stack([qa[h][plain] for h in queries])[None],
                    torch.stack([k[plain] for k in ka])[None],
                    assign,
                    c_k,
                    roots_k,
                )
                out_k[plain] = nr[0]
                for t, h in enumerate(queries):
                    out_q[h][plain] = nl[0, t]
            new_k[g], kbias = _split_aug(out_k, aug_k)
            if aug_k:
                new_kb[g] = kbias
            elif kb is not None:  # a key bias without a query bias cannot be refit: keep the mean
                new_kb[g] = kb[olds].mean(0)
            for h in queries:
                new_q[h], qbias = _split_aug(out_q[h], aug_k)
                if aug_k:
                    new_qb[h] = qbias

        # ---- values (and the output columns that read them)
        va = [_augment(v_heads[j], None if vb is None else vb[j], aug_v) for j in olds]
        nl, nr = fit_bilinear(o_heads[queries][None], torch.stack(va)[None], assign, None, roots_v)
        new_v[g], vbias = _split_aug(nr[0], aug_v)
        if aug_v:
            new_vb[g] = vbias
        new_o[queries] = nl[0]

    def flat(t):
        return None if t is None else t.reshape(-1, *t.shape[2:]).to(dtype)

    return Projections(
        q_w=flat(new_q),
        q_b=flat(new_qb),
        k_w=flat(new_k),
        k_b=flat(new_kb),
        v_w=flat(new_v),
        v_b=flat(new_vb),
        o_w=new_o.permute(2, 0, 1).reshape(p.o_w.shape).to(dtype),
        o_b=p.o_b,
    )


def is_lossless_input(k_w: torch.Tensor, v_w: torch.Tensor, old_kv: int, new_kv: int) -> bool:
    """True when every group's K and V heads are already identical (so pooling loses nothing)."""
    r = old_kv // new_kv
    for w in (k_w, v_w):
        g = _heads(w, old_kv).reshape(new_kv, r, -1)
        if not torch.equal(g, g[:, :1].expand_as(g)):
            return False
    return True


def rotary_dims_of(config, head_dim: int, rope: str | None) -> int:
    """How many leading dims of a head RoPE rotates (0 without RoPE), from the config's partial-rotary factor."""
    if rope is None:
        return 0
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    dims = int(head_dim * factor)
    return dims - dims % 2
