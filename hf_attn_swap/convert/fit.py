"""The ``fit`` strategy's refit, computed in the calibration's data space: real float64 products, no matrix roots.

What it computes is :func:`.pooling.fit_bilinear`'s solution (kept there as the plain reference; see that module
for the objective). The reference whitens with ``C^{1/2}``, takes an SVD of ``B = R Z C^{1/2}`` (``R`` the Cholesky
factors of the old heads' left Grams, ``Z`` the stacked old right factors) and un-whitens with ``C^{-1/2}``. The two
roots cancel:

- the SVD's left side ``U, S`` is the top eigen-part of the small Gram ``B B^H = R (Z C Z^H) R^H``
  (``r*D x r*D`` per group, ``r`` old heads of ``D`` rows);
- the new right factor ``S^{1/2} V^H C^{-1/2}`` equals ``S^{-1/2} U^H R Z``: a mix of the old heads' rows;
- the left transforms ``(R_j^{-1} U_j S^{1/2})^T`` need no ``C`` at all.

So a layer costs two real matrix products with ``C`` (all query rows, then all key rows; ``(H d) n^2`` flops)
instead of an ``n x n`` eigendecomposition, two ``n x n`` roots and complex products with ``C``. One MQA layer on
one (busy) CPU thread: E = 1024, 16 heads: 6.6 -> 0.5 s; E = 2048, 32 heads: 40.7 -> 3.2 s; and nothing ``n x n`` is
allocated beside ``C`` (float64 working set 186 -> 64 MiB and 595 -> 108 MiB).
The per-pair RoPE problems stay complex, but only in their small ``r x r`` Grams and in ``O(r n)`` mixes; every
product with ``C`` is real (a real symmetric ``C`` times ``a + ib`` is two real products). Query and output rows are
cast to float64 a chunk of heads at a time and written back in the model's dtype, so the float64 working set is a
few chunks, not copies of whole projections.

Two differences from the reference, both below what the model's dtype can hold:

- The reference raises eigenvalues of ``C`` below ``1e-6 x`` the largest before inverting its root; nothing is
  inverted here, so no such floor is applied. Where ``C`` is well conditioned both give the same numbers to float64
  round-off; where it is (nearly) singular (fewer calibration tokens than dimensions) the floor perturbed the
  reference's solution by about that relative amount.
- An eigenvector's sign (or, for RoPE pairs, complex phase) is arbitrary: the reference kept whatever the SVD
  returned. Here each new head is oriented so that it correlates positively, on the calibration activations, with
  the mean of the heads it replaces (duplicated heads come back as themselves, scaled). The bilinear forms the model
  computes, ``q_i . k_j`` under every rotary angle and ``Wo_i Wv_j``, do not depend on that choice, so the converted
  model computes the same function as the reference's; its stored weights can differ by that rotation.
"""

from __future__ import annotations

import torch

from .projections import Projections

#: relative ridge on the old heads' left Grams (the reference's): a head whose output is (nearly) dead stays finite.
RIDGE = 1e-9
#: float64 elements per chunk of query/output rows (8 MiB): bounds the working set whatever the layer's size.
CHUNK_ELEMENTS = 1 << 20


def _chunks(heads: int, row_elements: int):
    """``(start, stop)`` head ranges whose float64 rows hold about :data:`CHUNK_ELEMENTS` elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for s in range(0, heads, step):
        yield s, min(heads, s + step)


def _rows(w: torch.Tensor, b: torch.Tensor | None, start: int, stop: int, d: int, augmented: bool) -> torch.Tensor:
    """Heads ``start:stop`` of a ``(heads*d, E)`` weight as float64 ``(n_heads, d, n)``; bias appended as a column."""
    x = w[start * d : stop * d].to(torch.float64)
    if augmented:
        bias = b[start * d : stop * d] if b is not None else torch.zeros(x.shape[0], dtype=w.dtype, device=w.device)
        x = torch.cat([x, bias.to(torch.float64)[:, None]], 1)
    return x.reshape(stop - start, d, -1)


def _query_grams(w, b, heads: int, d: int, c: torch.Tensor, augmented: bool) -> torch.Tensor:
    """``Q_h C Q_h^T`` for every head ``h``: ``(heads, d, d)`` float64."""
    out = torch.empty(heads, d, d, dtype=torch.float64, device=w.device)
    for s, e in _chunks(heads, d * c.shape[0]):
        x = _rows(w, b, s, e, d, augmented)
        out[s:e] = (x @ c) @ x.mT  # (x @ c) is the only product with C: (chunk rows) x n^2 flops
    return out


def _output_grams(o_w: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """``O_h O_h^T`` for every head (``O_h`` = the head's ``d`` columns of ``o_w``, transposed): ``(heads, d, d)``."""
    out = torch.empty(heads, d, d, dtype=torch.float64, device=o_w.device)
    for s, e in _chunks(heads, d * o_w.shape[0]):
        x = o_w[:, s * d : e * d].to(torch.float64).reshape(o_w.shape[0], e - s, d).permute(1, 2, 0)
        out[s:e] = x @ x.mT
    return out


def _right_grams(w, b, groups: int, r: int, d: int, c: torch.Tensor, augmented: bool) -> torch.Tensor:
    """``Z_g C Z_g^T`` of each group's old heads, rows ordered (head, dim): ``(groups, r*d, r*d)`` float64."""
    out = torch.empty(groups, r * d, r * d, dtype=torch.float64, device=w.device)
    for g in range(groups):
        z = _rows(w, b, g * r, (g + 1) * r, d, augmented).reshape(r * d, -1)
        out[g] = (z @ c) @ z.mT
    return out


def _upper_factors(grams: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factors ``R_j`` (``G = R^T R``) of ``(B, r, D, D)`` Grams, after the reference's ridge."""
    d = grams.shape[-1]
    scale = grams.diagonal(dim1=-2, dim2=-1).abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-30)
    ridged = grams + RIDGE * scale[..., None] * torch.eye(d, dtype=grams.dtype, device=grams.device)
    return torch.linalg.cholesky(ridged).mT


def _shared_real(left: torch.Tensor, right: torch.Tensor):
    """The real problem (plain dims, values): ``D``-row shared factor for each of ``B`` groups of ``r`` old heads.

    Args:
        left: ``(B, r, D, D)`` left Grams of the old heads (their readers' ``L C_left L^T``, summed).
        right: ``(B, r*D, r*D)`` right Gram ``Z C Z^T`` of the old heads.

    Returns:
        ``mix`` ``(B, r, D, D)``: new right = ``sum_j mix_j @ Z_j``; ``transforms`` ``(B, r, D, D)``: new left of a
        reader of old head ``j`` = ``transforms_j @ L``.
    """
    b_, r, d, _ = left.shape
    up = _upper_factors(left)  # (B, r, D, D)
    blocks = right.reshape(b_, r, d, r, d)
    # B B^T = R (Z C Z^T) R^T with R = blockdiag(R_j)
    gram = torch.einsum("bjxy,bjylz,blwz->bjxlw", up, blocks, up).reshape(b_, r * d, r * d)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    s = evals[:, -d:].flip(-1).clamp_min(0).sqrt()  # singular values of B, descending like an SVD's
    u = evecs[:, :, -d:].flip(-1).reshape(b_, r, d, d)  # U_j blocks, columns = new rows
    # Orientation: new row t correlates positively with row t of the old heads' mean on the calibration.
    to_mean = torch.einsum("bjxt,bjxy,bjylt->bt", u, up, blocks)  # diag(sum_j U_j^T R_j sum_l Z_j C Z_l^T)
    u = u * torch.where(to_mean < 0, -1.0, 1.0).to(u.dtype)[:, None, None, :]
    s_safe = s.clamp_min(torch.finfo(s.dtype).tiny)
    mix = (u.mT @ up) * s_safe.rsqrt()[:, None, :, None]  # S^{-1/2} U_j^T R_j
    transforms = torch.linalg.solve_triangular(up, u * s.sqrt()[:, None, None, :], upper=True).mT
    return mix, transforms


def _shared_complex(left: torch.Tensor, right: torch.Tensor):
    """The RoPE-pair problem: one complex row per pair, shared by ``r`` old heads (``D = 1``), ``B`` problems.

    Args:
        left: ``(B, r)`` real left Grams (a pair's ``qa C qa + qb C qb``, summed over the old head's readers).
        right: ``(B, r, r)`` complex Hermitian right Gram ``z_j C z_l^H``.

    Returns:
        ``mix`` ``(B, r)`` complex: new right = ``sum_j mix_j z_j``; ``transforms`` ``(B, r)`` complex: a reader of old
        head ``j`` becomes ``transforms_j * l`` (``l`` = the reference's conjugated query pair).
    """
    up = _upper_factors(left[..., None, None])[..., 0, 0]  # (B, r) real: sqrt of the ridged Gram
    gram = up[:, :, None] * right * up[:, None, :]
    evals, evecs = torch.linalg.eigh(gram)
    s = evals[:, -1].clamp_min(0).sqrt()
    u = evecs[:, :, -1]  # (B, r)
    # Phase: the new pair's inner product with the mean of the old pairs (on the calibration) is real positive.
    c = (u.conj() * up * right.sum(-1)).sum(-1)
    mag = c.abs()
    phase = torch.where(mag > 0, c / mag.clamp_min(torch.finfo(mag.dtype).tiny), torch.ones_like(c))
    u = u * phase[:, None]
    s_safe = s.clamp_min(torch.finfo(s.dtype).tiny)
    mix = u.conj() * up * s_safe.rsqrt()[:, None]
    transforms = u * s.sqrt()[:, None] / up
    return mix, transforms


def fit_projections(
    p: Projections,
    num_heads: int,
    old_kv: int,
    new_kv: int,
    head_dim: int,
    rotary_dims: int,
    qk_norm: bool,
    cov: torch.Tensor,
    value_cov: torch.Tensor | None = None,
) -> Projections:
    """``fit`` for one attention module: the reference ``pooling._fit``'s result (see the module docstring).

    Args:
        p: canonical projections (any float dtype; the result has the same dtype and device).
        num_heads, old_kv, new_kv, head_dim: query heads, KV heads before/after (``new_kv`` divides ``old_kv``), head
            size.
        rotary_dims: leading dims of each head that RoPE rotates in pairs ``(i, i + rotary_dims/2)``; 0 = none.
        qk_norm: keys pass through a norm: they are mean-pooled and only values/outputs are refit.
        cov: ``E[x x^T]`` of the attention input with a trailing constant-1 coordinate, ``(E+1, E+1)``.
        value_cov: the statistic the values are fitted on instead of ``cov`` (same layout): ``refit`` passes the
            second moment of the attention-mixed inputs ``sum_j a_ij x_j``, which is what ``v_proj`` feeds ``o_proj``
            through; None = ``cov``.
    """
    dtype, device = p.k_w.dtype, p.k_w.device
    e, d = p.k_w.shape[1], head_dim
    cov = cov.to(device=device, dtype=torch.float64)
    r, per_kv = old_kv // new_kv, num_heads // old_kv
    owner = torch.arange(num_heads, device=device) // per_kv  # old KV head of each query head
    aug_k = p.q_b is not None and p.k_b is not None
    aug_v = p.v_b is not None
    c_k = cov if aug_k else cov[:e, :e]
    vcov = cov if value_cov is None else value_cov.to(device=device, dtype=torch.float64)
    c_v = vcov if aug_v else vcov[:e, :e]
    out = {}

    if qk_norm:  # keys are not linear in x behind a norm: mean-pool them, keep the queries (as the reference does)
        out["k_w"] = _mean_heads(p.k_w, old_kv, new_kv)
        out["k_b"] = None if p.k_b is None else _mean_heads(p.k_b, old_kv, new_kv)
    else:
        out.update(_fit_keys(p, num_heads, old_kv, new_kv, d, rotary_dims, c_k, aug_k, owner))
        if p.k_b is not None and not aug_k:  # a key bias without a query bias cannot be refit: keep the mean
            out["k_b"] = _mean_heads(p.k_b, old_kv, new_kv)
    out.update(_fit_values(p, num_heads, old_kv, new_kv, d, c_v, aug_v, owner))
    return p.replace(**{k: v.to(dtype) if v is not None else None for k, v in out.items()})


def _mean_heads(w: torch.Tensor, old_kv: int, new_kv: int) -> torch.Tensor:
    g = w.reshape(new_kv, old_kv // new_kv, -1, *w.shape[1:])
    return g.to(torch.float64).mean(1).reshape(-1, *w.shape[1:])


def _fit_keys(p, num_heads, old_kv, new_kv, d, rotary_dims, c, aug, owner) -> dict:
    r = old_kv // new_kv
    half = rotary_dims // 2
    a_idx = torch.arange(half, device=c.device)
    b_idx = a_idx + half
    plain = torch.arange(rotary_dims, d, device=c.device)
    n = c.shape[0]
    q_grams = _query_grams(p.q_w, p.q_b, num_heads, d, c, aug)
    left = torch.zeros(old_kv, d, d, dtype=torch.float64, device=c.device).index_add_(0, owner, q_grams)
    del q_grams
    right = _right_grams(p.k_w, p.k_b, new_kv, r, d, c, aug).reshape(new_kv, r, d, r, d)
    z = _rows(p.k_w, p.k_b, 0, old_kv, d, aug).reshape(new_kv, r, d, n)  # old key rows (small: KV heads only)
    new_k = torch.empty(new_kv, d, n, dtype=torch.float64, device=c.device)
    pair_t = plain_t = None
    if half:
        # left Gram of a pair (D = 1): qa C qa + qb C qb; right Gram z_j C z_l^H with z = a + ib (a real C).
        lp = left.diagonal(dim1=-2, dim2=-1)
        lp = (lp[:, a_idx] + lp[:, b_idx]).reshape(new_kv, r, half).transpose(1, 2).reshape(-1, r)
        ra, rb = right[:, :, a_idx][..., a_idx], right[:, :, b_idx][..., b_idx]
        rab = right[:, :, a_idx][..., b_idx]  # a_j C b_l, indexed (g, j, pair, l, pair')
        pick = lambda t: t.diagonal(dim1=2, dim2=4).permute(0, 3, 1, 2)  # noqa: E731 -- same pair: (g, P, j, l)
        rg = torch.complex(pick(ra) + pick(rb), pick(rab).mT - pick(rab))  # b_j C a_l = (a_l C b_j)
        mix, pair_t = _shared_complex(lp, rg.reshape(-1, r, r))
        zc = torch.complex(z[:, :, a_idx], z[:, :, b_idx])  # (G, r, P, n)
        new_pairs = torch.einsum("gpj,gjpn->gpn", mix.reshape(new_kv, half, r), zc)
        new_k[:, a_idx], new_k[:, b_idx] = new_pairs.real, new_pairs.imag
        pair_t = pair_t.reshape(new_kv, half, r).transpose(1, 2).reshape(old_kv, half)  # per old KV head
    if len(plain):
        lq = left[:, plain][..., plain].reshape(new_kv, r, len(plain), len(plain))
        rq = right[:, :, plain][..., plain].reshape(new_kv, r * len(plain), r * len(plain))
        mix, plain_t = _shared_real(lq, rq)
        new_k[:, plain] = torch.einsum("gjxy,gjyn->gxn", mix, z[:, :, plain])
        plain_t = plain_t.reshape(old_kv, len(plain), len(plain))
    out = {"k_w": new_k[..., :-1] if aug else new_k}
    if aug:
        out["k_b"] = new_k[..., -1]
    out["k_w"] = out["k_w"].reshape(new_kv * d, -1)
    if aug:
        out["k_b"] = out["k_b"].reshape(-1)
    # Queries: each head re-mixed by its old KV head's transforms, a chunk of heads at a time.
    new_q = torch.empty_like(p.q_w)
    new_qb = None if p.q_b is None else p.q_b.clone()
    for s, e_ in _chunks(num_heads, d * n):
        x = _rows(p.q_w, p.q_b, s, e_, d, aug)  # (h, d, n)
        y = torch.empty_like(x)
        if half:
            t = pair_t[owner[s:e_]][..., None]  # (h, P, 1): new pair = conj(t) (qa + i qb)
            qa, qb = x[:, a_idx], x[:, b_idx]
            y[:, a_idx] = t.real * qa + t.imag * qb
            y[:, b_idx] = t.real * qb - t.imag * qa
        if plain_t is not None:
            y[:, plain] = plain_t[owner[s:e_]] @ x[:, plain]
        if aug:
            new_qb[s * d : e_ * d] = y[..., -1].reshape(-1).to(new_qb.dtype)
            y = y[..., :-1]
        new_q[s * d : e_ * d] = y.reshape(-1, y.shape[-1]).to(new_q.dtype)
    out["q_w"], out["q_b"] = new_q, new_qb
    return out


def _fit_values(p, num_heads, old_kv, new_kv, d, c, aug, owner) -> dict:
    r = old_kv // new_kv
    n = c.shape[0]
    o_grams = _output_grams(p.o_w, num_heads, d)
    left = torch.zeros(old_kv, d, d, dtype=torch.float64, device=c.device).index_add_(0, owner, o_grams)
    del o_grams
    right = _right_grams(p.v_w, p.v_b, new_kv, r, d, c, aug)
    mix, transforms = _shared_real(left.reshape(new_kv, r, d, d), right)
    z = _rows(p.v_w, p.v_b, 0, old_kv, d, aug).reshape(new_kv, r, d, n)
    new_v = torch.einsum("gjxy,gjyn->gxn", mix, z)
    transforms = transforms.reshape(old_kv, d, d)
    out = {"v_w": (new_v[..., :-1] if aug else new_v).reshape(new_kv * d, -1)}
    if aug:
        out["v_b"] = new_v[..., -1].reshape(-1)
    # Outputs: head h's columns O_h^T become O_h^T T_j^T, a chunk of heads at a time.
    new_o = torch.empty_like(p.o_w)
    for s, e_ in _chunks(num_heads, d * p.o_w.shape[0]):
        x = p.o_w[:, s * d : e_ * d].to(torch.float64).reshape(p.o_w.shape[0], e_ - s, d).transpose(0, 1)
        y = x @ transforms[owner[s:e_]].mT  # (h, E_out, d)
        new_o[:, s * d : e_ * d] = y.transpose(0, 1).reshape(p.o_w.shape[0], -1).to(new_o.dtype)
    out["o_w"] = new_o
    return out
