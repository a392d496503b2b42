"""Head alignment before merging: orthogonal Procrustes rotations of each K/V head of a group (strategy ``align``).

Mean-pooling assumes that the heads of a group use the same coordinates, but nothing in training ties head ``j``'s
basis to head ``j'``'s: two heads can compute nearly the same keys in rotated coordinates, and their mean is then
much smaller and blurrier than either. ``align`` (after Jin et al. 2024, "Align Attention Heads Before Merging Them")
first rotates every head of a group onto a common reference, then mean-pools:

- keys: ``K_j -> A_j K_j`` and every query head ``i`` that reads head ``j``: ``Q_i -> A_j Q_i`` (biases likewise), so
  ``q_i . k_j = (A_j q_i) . (A_j k_j)`` is unchanged for orthogonal ``A_j``;
- values: ``V_j -> B_j V_j`` and the output columns of those query heads: ``O_i -> O_i B_j^T``, so
  ``O_i V_j x`` is unchanged.

The rotations minimise the calibration activations' squared distance between a head's rotated outputs and the
reference, ``E || A_j k_j(x) - k_ref(x) ||^2``: an orthogonal Procrustes problem on the cross second moment
``E[k_ref k_j^T] = K_ref C K_j^T`` (``C = E[x x^T]`` of the attention input, the statistic ``fit`` uses; with a
trailing constant-1 coordinate when the projection has a bias). The reference is the group's first head for the first
round, then the mean of the aligned heads (generalised Procrustes analysis), for a fixed number of rounds.

What is exact and what is not:

- Before pooling the rotation is exact: the model computes the same function (up to float round-off). Under RoPE this
  holds only for rotations that commute with every position's rotary rotation. RoPE rotates each frequency pair
  ``(i, i + rotary_dims/2)`` by its own angle, so the commuting orthogonal maps are one 2x2 ROTATION per pair (a
  reflection anticommutes with it) and any orthogonal map on the dims RoPE leaves alone; keys are aligned within
  that set. Values carry no RoPE and get a full orthogonal ``d x d`` rotation.
- The pooling itself is the approximation, as in ``mean``: it is exact when the aligned heads coincide (e.g. heads
  that are rotated copies of each other), and in general loses whatever the aligned heads still disagree on.
- Keys behind a norm (``qk_norm``: Qwen3, Gemma 3) are not aligned: the norm's per-dim gain does not commute with a
  rotation. Their keys are mean-pooled; values are still aligned.

``align`` followed by ``fit`` is not a separate strategy because it would be ``fit`` itself: the fit already lets
every old head's queries (output columns) be re-mixed by an arbitrary ``d x d`` map (one complex scalar per RoPE
pair), which contains these rotations, and the rotation leaves every target form unchanged, so its optimum is the
same (``tests/test_align.py`` checks this on a tiny model).
"""

from __future__ import annotations

import torch

from .projections import Projections

#: rounds of generalised Procrustes (round 1 aligns to the first head; later rounds to the aligned mean).
ALIGN_ROUNDS = 8


def nearest_rotations(cross: torch.Tensor, rotary_dims: int) -> torch.Tensor:
    """The orthogonal ``A`` maximising ``trace(A cross^T)`` (so ``A k_j`` is closest to ``k_ref`` when
    ``cross = E[k_ref k_j^T]``), restricted to maps that commute with RoPE.

    Args:
        cross: ``(..., d, d)`` cross second moments.
        rotary_dims: leading dims RoPE rotates, in pairs ``(i, i + rotary_dims/2)``; 0 = no RoPE (a full orthogonal
            Procrustes solution).

    Returns:
        ``(..., d, d)`` orthogonal matrices: a 2x2 rotation (determinant +1) on each rotary pair, the Procrustes
        solution ``U V^T`` of ``cross = U S V^T`` on the remaining dims, zero elsewhere.
    """
    d = cross.shape[-1]
    out = torch.zeros_like(cross)
    half = rotary_dims // 2
    if half:
        a = torch.arange(half, device=cross.device)
        b = a + half
        # For R = [[c, -s], [s, c]], trace(R M^T) = c (M_aa + M_bb) + s (M_ba - M_ab): the best angle in closed form.
        angle = torch.atan2(cross[..., b, a] - cross[..., a, b], cross[..., a, a] + cross[..., b, b])
        cos, sin = angle.cos(), angle.sin()
        out[..., a, a], out[..., b, b] = cos, cos
        out[..., a, b], out[..., b, a] = -sin, sin
    if rotary_dims < d:
        plain = slice(rotary_dims, d)
        u, _, vh = torch.linalg.svd(cross[..., plain, plain])
        out[..., plain, plain] = u @ vh
    return out


def procrustes_align(heads: torch.Tensor, second_moment: torch.Tensor, rotary_dims: int,
                     rounds: int = ALIGN_ROUNDS) -> torch.Tensor:
    """Rotations aligning the heads of every group, batched over groups (generalised Procrustes analysis).

    Args:
        heads: ``(G, r, d, n)`` the ``r`` heads of each of ``G`` groups (``n`` inputs, biases as a last column).
        second_moment: ``(n, n)`` second moment of the inputs.
        rotary_dims: see :func:`nearest_rotations`.
        rounds: alignment rounds; round 1 aligns to each group's first head, later ones to the mean of the aligned
            heads.

    Returns:
        ``(G, r, d, d)`` rotations ``A`` such that ``A[g, j] @ heads[g, j]`` are aligned.
    """
    w = heads.double()
    c = second_moment.double()
    ref = w[:, 0]
    rot = torch.eye(w.shape[-2], dtype=w.dtype).expand(*w.shape[:2], -1, -1)
    for _ in range(rounds):
        cross = (ref @ c)[:, None] @ w.mT  # (G, r, d, d) = E[k_ref k_j^T]
        rot = nearest_rotations(cross, rotary_dims)
        ref = (rot @ w).mean(1)
    return rot


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``(h, d, E)`` weights and ``(h, d)`` bias -> ``(h, d, E+1)``: the bias as the weight of a constant input."""
    return w if b is None else torch.cat([w, b[..., None]], -1)


def align_projections(
    p: Projections,
    *,
    num_heads: int,
    old_kv: int,
    new_kv: int,
    head_dim: int,
    rotary_dims: int,
    qk_norm: bool,
    covariance: torch.Tensor,
    rounds: int = ALIGN_ROUNDS,
) -> Projections:
    """Rotate each K/V head onto its group's reference, with the queries and output columns that read it.

    The result still has ``old_kv`` heads and computes the same attention (see the module docstring for what is
    exact); mean-pooling it to ``new_kv`` heads is the ``align`` strategy.

    Args:
        p: canonical projections of one attention module.
        num_heads: query heads.
        old_kv, new_kv: KV heads before/after pooling (``new_kv`` divides ``old_kv``; groups are neighbouring heads).
        head_dim: per-head size.
        rotary_dims: leading dims of each head that RoPE rotates (0 = no RoPE).
        qk_norm: keys pass through a norm after ``k_proj`` (keys are then left unrotated).
        covariance: ``(E+1, E+1)`` second moment of the attention input with a trailing constant-1 coordinate.
        rounds: generalised Procrustes rounds.

    Returns:
        Rotated projections, in the inputs' dtype.
    """
    dtype, e = p.k_w.dtype, p.k_w.shape[1]
    cov = covariance.double()
    r, q_per_kv = old_kv // new_kv, num_heads // old_kv

    def heads(w: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return None if w is None else w.double().reshape(n, head_dim, *w.shape[1:])

    def rotations(w, b, rot_dims):
        stacked = _with_bias(w, b).reshape(new_kv, r, head_dim, -1)
        c = cov if b is not None else cov[:e, :e]
        return procrustes_align(stacked, c, rot_dims, rounds).reshape(old_kv, head_dim, head_dim)

    def per_query(rot):  # each query head's rotation: the one of the KV head it reads
        return rot.repeat_interleave(q_per_kv, 0)

    out = {}
    k_w, k_b, v_w, v_b = heads(p.k_w, old_kv), heads(p.k_b, old_kv), heads(p.v_w, old_kv), heads(p.v_b, old_kv)
    if not qk_norm:
        a = rotations(k_w, k_b, rotary_dims)
        out["k_w"] = a @ k_w
        out["k_b"] = None if k_b is None else (a @ k_b[..., None])[..., 0]
        out["q_w"] = per_query(a) @ heads(p.q_w, num_heads)
        out["q_b"] = None if p.q_b is None else (per_query(a) @ heads(p.q_b, num_heads)[..., None])[..., 0]
    b = rotations(v_w, v_b, 0)
    out["v_w"] = b @ v_w
    out["v_b"] = None if v_b is None else (b @ v_b[..., None])[..., 0]
    o_heads = p.o_w.double().reshape(p.o_w.shape[0], num_heads, head_dim).permute(1, 2, 0)  # (H, d, E_out) = O_i^T
    out["o_w"] = (per_query(b) @ o_heads).permute(2, 0, 1).reshape(p.o_w.shape)

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:  # (h, d, ...) -> (h*d, ...)
        return None if t is None else t.reshape(-1, *t.shape[2:]).to(dtype)

    return p.replace(**{k: (v.to(dtype) if k == "o_w" else flat(v)) for k, v in out.items()})
