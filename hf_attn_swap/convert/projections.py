"""Read and write attention projections in one canonical layout, whatever the architecture stores.

Canonical layout: ``(out_features, in_features)`` weights like ``nn.Linear``, per head contiguous rows:
``q (H*d, E)``, ``k``/``v`` ``(H_kv*d, E)``, ``o (E, H*d)``, biases ``(out,)`` or None. The conversion code works on
this layout only; the adapter row says how to get there and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .adapters import ArchAdapter


@dataclass
class Projections:
    """Canonical Q/K/V/O tensors of one attention module (see module docstring)."""

    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None

    def replace(self, **kw: Any) -> "Projections":
        return replace(self, **kw)


@dataclass
class AttentionSite:
    """One attention module found in a model, with what the conversion needs to know about it."""

    name: str
    module: nn.Module
    parent: nn.Module
    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def find_attention(model: nn.Module, adapter: ArchAdapter) -> list[AttentionSite]:
    """The model's self-attention modules in layer order."""
    named = dict(model.named_modules())
    sites = []
    for name, module in named.items():
        # Match through the MRO so modules whose forward we replaced (a subclass) are still found.
        if not any(c.__name__ in adapter.attention_classes for c in type(module).__mro__):
            continue
        parent = named[name.rsplit(".", 1)[0]] if "." in name else model
        head_dim = int(getattr(module, adapter.head_dim_attr))
        k_w = read_projections(module, parent, adapter, head_dim=head_dim, kv_only=True)
        num_heads = int(model.config.num_attention_heads)
        sites.append(
            AttentionSite(
                name=name,
                module=module,
                parent=parent,
                layer_idx=len(sites),
                num_heads=num_heads,
                num_kv_heads=k_w.shape[0] // head_dim,
                head_dim=head_dim,
            )
        )
    if not sites:
        raise ValueError(
            f"no attention modules of class {adapter.attention_classes} found in {type(model).__name__} "
            f"(model_type {adapter.model_type!r})"
        )
    return sites


def _resolve(module: nn.Module, parent: nn.Module, path: str) -> nn.Module:
    obj = parent if path.startswith("^") else module
    for part in path.lstrip("^").split("."):
        obj = getattr(obj, part)
    return obj


def _qkv_sizes(heads: int, head_dim: int, total: int) -> tuple[int, int, int]:
    q = heads * head_dim
    kv = (total - q) // 2
    return q, kv, kv


def read_projections(
    module: nn.Module,
    parent: nn.Module,
    adapter: ArchAdapter,
    *,
    head_dim: int,
    kv_only: bool = False,
) -> Projections | torch.Tensor:
    """Canonical projections of one module (or just the K weight when ``kv_only``)."""
    config = module.config if hasattr(module, "config") else None
    heads = int(config.num_attention_heads) if config is not None else None
    if adapter.layout == "separate":
        q, k, v = (getattr(module, n) for n in (adapter.q, adapter.k, adapter.v))
        if kv_only:
            return k.weight
        o = _resolve(module, parent, adapter.o)
        return Projections(q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight, o.bias)

    fused = getattr(module, adapter.q)
    if adapter.layout == "conv1d":
        w, b = fused.weight.t(), fused.bias  # Conv1D stores (in, out)
    else:
        w, b = fused.weight, fused.bias
    if adapter.layout == "fused_interleaved" and not getattr(module, "_hf_attn_swap_block_qkv", False):
        # GPT-NeoX: rows are [q_h | k_h | v_h] for each head h; regroup into [Q | K | V].
        n_heads = w.shape[0] // (3 * head_dim)
        w = w.reshape(n_heads, 3, head_dim, -1).transpose(0, 1).reshape(3 * n_heads * head_dim, -1)
        if b is not None:
            b = b.reshape(n_heads, 3, head_dim).transpose(0, 1).reshape(-1)
    sizes = _qkv_sizes(heads, head_dim, w.shape[0])
    q_w, k_w, v_w = w.split(sizes, dim=0)
    if kv_only:
        return k_w
    q_b = k_b = v_b = None
    if b is not None:
        q_b, k_b, v_b = b.split(sizes, dim=0)
    o = _resolve(module, parent, adapter.o)
    o_w = o.weight.t() if adapter.layout == "conv1d" else o.weight
    return Projections(q_w, q_b, k_w, k_b, v_w, v_b, o_w, o.bias)


def _param(t: torch.Tensor | None, like: torch.Tensor) -> nn.Parameter | None:
    if t is None:
        return None
    return nn.Parameter(t.detach().to(dtype=like.dtype, device=like.device).contiguous(), requires_grad=like.requires_grad)


def build_new_modules(site: AttentionSite, adapter: ArchAdapter, new: Projections) -> dict[str, Any]:
    """Phase 1 of a conversion: new parameters for one module, computed without touching the model.

    Returns a dict of ``(owner_module, attr_name) -> new value`` assignments that :func:`commit` applies.
    """
    module, parent = site.module, site.parent
    assignments: dict[tuple[int, str], tuple[nn.Module, str, Any]] = {}

    def put(owner: nn.Module, attr: str, value: Any) -> None:
        assignments[(id(owner), attr)] = (owner, attr, value)

    if adapter.layout == "separate":
        for name, w, b in ((adapter.q, new.q_w, new.q_b), (adapter.k, new.k_w, new.k_b), (adapter.v, new.v_w, new.v_b)):
            old = getattr(module, name)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device="meta")
            lin.weight = _param(w, old.weight)
            if old.bias is not None:
                lin.bias = _param(b, old.bias)
            put(module, name, lin)
    else:
        fused = getattr(module, adapter.q)
        w = torch.cat([new.q_w, new.k_w, new.v_w], dim=0)
        b = None if fused.bias is None else torch.cat([new.q_b, new.k_b, new.v_b], dim=0)
        if adapter.layout == "conv1d":
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(w.shape[0], w.shape[1])
            conv.weight = _param(w.t(), fused.weight)
            conv.bias = _param(b, fused.bias)
            put(module, adapter.q, conv)
            e = new.q_w.shape[0]
            put(module, "split_size", [e, new.k_w.shape[0], new.v_w.shape[0]])
        else:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=fused.bias is not None, device="meta")
            lin.weight = _param(w, fused.weight)
            if fused.bias is not None:
                lin.bias = _param(b, fused.bias)
            put(module, adapter.q, lin)
            if adapter.layout == "fused_interleaved":
                put(module, "_hf_attn_swap_block_qkv", True)
    if adapter.patch:
        from .patches import patched_class

        put(module, "__class__", patched_class(module, adapter.patch))
    o = _resolve(module, parent, adapter.o)
    o_w = new.o_w.t() if adapter.layout == "conv1d" else new.o_w
    if o_w is not o.weight and not torch.equal(o_w, o.weight):
        put(o, "weight", _param(o_w, o.weight))
    kv_heads = new.k_w.shape[0] // site.head_dim
    for attr, kind in adapter.module_attrs.items():
        put(module, attr, site.num_heads // kv_heads if kind == "groups" else kv_heads)
    return assignments


def _undo(done: list[tuple[nn.Module, str, Any, bool]]) -> None:
    for owner, attr, old, had in reversed(done):
        if had:
            setattr(owner, attr, old)
        else:
            delattr(owner, attr)


def _apply(assignments: list[dict[Any, tuple[nn.Module, str, Any]]], done: list) -> None:
    for block in assignments:
        for owner, attr, value in block.values():
            had = hasattr(owner, attr)
            done.append((owner, attr, getattr(owner, attr, None), had))
            setattr(owner, attr, value)


def commit(assignments: list[dict[Any, tuple[nn.Module, str, Any]]]) -> None:
    """Phase 2: apply all assignments; on any failure put back every old value (the model is left as it was)."""
    done: list[tuple[nn.Module, str, Any, bool]] = []
    try:
        _apply(assignments, done)
    except BaseException:
        _undo(done)
        raise


@contextlib.contextmanager
def applied(block: dict[Any, tuple[nn.Module, str, Any]]) -> Iterator[None]:
    """One module's assignments in force inside the block only (``refit`` runs a converted layer before commit)."""
    done: list[tuple[nn.Module, str, Any, bool]] = []
    try:
        _apply([block], done)
        yield
    finally:
        _undo(done)
