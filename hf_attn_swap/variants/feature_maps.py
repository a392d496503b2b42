"""Feature maps ``phi`` of linear attention, applied to the queries and keys the attention function receives.

All of them return fp32 features ``(b, heads, n, m)``. The plain formulas live in
:func:`hf_attn_swap.reference.reference_feature_map`; these modules add parameters, seeding and redraws.

* ``elu`` (alias ``elu+1``): ``elu(x) + 1`` (Katharopoulos et al. 2020).
* ``relu``: ``relu(x)``.
* ``performer`` (alias ``favor+``): FAVOR+ positive orthogonal random features, ``exp(w.x' - |x'|^2 / 2) / sqrt(m)``
  with ``x' = x / d^(1/4)``: an unbiased estimate of the softmax kernel ``exp(q.k / sqrt(d))``. Seeded; redraw with
  :meth:`FeatureMap.redraw`.
* ``taylor`` (alias ``based``): ``[1, x', x' (x) x' / sqrt(2)]``, the 2nd-order Taylor expansion of ``exp(q.k/sqrt(d))``
  (Based). Feature size ``1 + d + d^2``.
* ``hedgehog``: learnable per-head ``x' W + b`` with antithetic exponential features
  ``[exp(z - |x'|^2/2), exp(-z - |x'|^2/2)] / sqrt(2m)``. Initialised with FAVOR+ random features (so at
  initialisation it estimates softmax attention), then trained by attention transfer. Queries and keys have separate
  maps (query head ``h`` starts from the features of its KV head).
"""

from __future__ import annotations

import math

import torch
from torch import nn

FEATURE_MAPS = ("elu", "relu", "performer", "taylor", "hedgehog")
ALIASES = {"elu+1": "elu", "favor+": "performer", "favor": "performer", "based": "taylor"}


def canonical_feature_map(name: str) -> str:
    """``name`` or its canonical form; ``ValueError`` listing the allowed names otherwise."""
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in FEATURE_MAPS:
        allowed = ", ".join(list(FEATURE_MAPS) + [f"{a} (= {b})" for a, b in ALIASES.items()])
        raise ValueError(f"unknown feature map {name!r}; allowed: {allowed}")
    return key


def orthogonal_random_features(heads: int, dim: int, num: int, generator: torch.Generator) -> torch.Tensor:
    """``(heads, dim, num)`` Gaussian features, orthogonalised in blocks of ``dim`` and rescaled to chi-distributed
    norms (FAVOR+'s orthogonal random features)."""
    out = torch.empty(heads, dim, num)
    for h in range(heads):
        cols, left = [], num
        while left > 0:
            g = torch.randn(dim, dim, generator=generator)
            qm, _ = torch.linalg.qr(g)
            cols.append(qm[:, : min(left, dim)])
            left -= dim
        w = torch.cat(cols, dim=1)
        norms = torch.randn(num, dim, generator=generator).norm(dim=1)
        out[h] = w * norms[None, :]
    return out


class FeatureMap(nn.Module):
    """One layer's feature map (queries and keys).

    Args:
        name: a name from :data:`FEATURE_MAPS`.
        num_heads, num_kv_heads, head_dim: the layer's shapes.
        num_features: random/learned features ``m`` for performer and hedgehog (hedgehog outputs ``2m``).
        seed: seed of the random features.
        window_mix: also hold ``log_gamma`` ``(H,)``, the hybrid's per-head weight of its softmax window.
    """

    def __init__(self, name: str, num_heads: int, num_kv_heads: int, head_dim: int, num_features: int, seed: int,
                 window_mix: bool = False):
        super().__init__()
        self.name = canonical_feature_map(name)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_features = num_features
        self.group = num_heads // num_kv_heads
        if self.name == "performer":
            self.register_buffer("projection", self._draw(seed), persistent=True)
        elif self.name == "hedgehog":
            w = self._draw(seed)
            self.k_weight = nn.Parameter(w.clone())
            self.k_bias = nn.Parameter(torch.zeros(num_kv_heads, num_features))
            self.q_weight = nn.Parameter(w.repeat_interleave(self.group, dim=0).clone())
            self.q_bias = nn.Parameter(torch.zeros(num_heads, num_features))
        if window_mix:  # hybrid (linear + softmax window): log of the window part's weight per head, learned
            self.log_gamma = nn.Parameter(torch.zeros(num_heads))

    def _draw(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return orthogonal_random_features(self.num_kv_heads, self.head_dim, self.num_features, g)

    @torch.no_grad()
    def redraw(self, seed: int) -> None:
        """Draw new performer random features (a no-op for the other maps)."""
        if self.name == "performer":
            self.projection.copy_(self._draw(seed).to(self.projection))

    @property
    def feature_dim(self) -> int:
        d = self.head_dim
        return {"elu": d, "relu": d, "taylor": 1 + d + d * d, "performer": self.num_features,
                "hedgehog": 2 * self.num_features}[self.name]

    def extra_repr(self) -> str:
        return f"{self.name}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, features={self.feature_dim}"

    def forward(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Features of queries (``kind="q"``, ``H`` heads) or keys (``"k"``, ``H_kv`` heads), fp32."""
        x = x.float()
        if self.name == "elu":
            return torch.nn.functional.elu(x) + 1.0
        if self.name == "relu":
            return torch.relu(x)
        d = x.shape[-1]
        xs = x * d**-0.25
        if self.name == "taylor":
            outer = (xs.unsqueeze(-1) * xs.unsqueeze(-2)).flatten(-2) * (1 / math.sqrt(2))
            return torch.cat([torch.ones_like(xs[..., :1]), xs, outer], dim=-1)
        sq = (xs * xs).sum(-1, keepdim=True) * 0.5
        if self.name == "performer":
            proj = self.projection.float()
            if kind == "q" and x.shape[1] != proj.shape[0]:
                proj = proj.repeat_interleave(self.group, dim=0)  # (H, d, m): tiny, not K/V
            z = torch.einsum("bhnd,hdm->bhnm", xs, proj)
            return torch.exp(z - sq) * (1 / math.sqrt(self.num_features))
        w, bias = (self.q_weight, self.q_bias) if kind == "q" else (self.k_weight, self.k_bias)
        z = torch.einsum("bhnd,hdm->bhnm", xs, w.float()) + bias.float()[None, :, None, :]
        return torch.cat([torch.exp(z - sq), torch.exp(-z - sq)], dim=-1) * (1 / math.sqrt(2 * self.num_features))

    def reference_params(self, kind: str) -> dict:
        """Keyword arguments of :func:`hf_attn_swap.reference.reference_feature_map` for the same map."""
        if self.name == "performer":
            proj = self.projection
            if kind == "q":
                proj = proj.repeat_interleave(self.group, dim=0)
            return {"projection": proj}
        if self.name == "hedgehog":
            return ({"projection": self.q_weight, "bias": self.q_bias} if kind == "q"
                    else {"projection": self.k_weight, "bias": self.k_bias})
        return {}
