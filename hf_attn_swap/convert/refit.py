"""The ``refit`` strategy: ``fit``, with the values fitted on what they are read through, then every output
projection re-solved on the converted model's own activations. Closed form throughout: no gradient step.

``fit`` matches each layer's bilinear forms under the statistics of the attention input ``x``. Two things it
leaves on the table, both measured on SmolLM2-135M 3 -> 1 KV heads (shakespeare validation, 8191 tokens):

1. **Values are read through the attention.** ``o_proj`` sees ``sum_j a_ij v_j``, so the value error that reaches
   the output is ``dWv m_i`` with ``m_i = sum_j a_ij x_j``, the attention-mixed input, not ``dWv x_i``. The value
   problem here takes the second moment of ``m`` (averaged over the layer's query heads) in place of ``x``'s:
   126.6 -> 95.4 perplexity with the same 4096 calibration tokens. (The analogous change for the keys, an
   attention-weighted centred covariance from the softmax's second-order expansion, made it worse, 100.7: not used.)
2. **Errors compound.** Layer by layer, in order (as GPTQ does), the converted layer runs on the hidden states the
   converted layers before it produce, and its output projection is re-solved by ridge regression so that what the
   converted heads now emit maps onto the ORIGINAL layer's attention output at the same tokens. This corrects the
   layer's own K/V loss and part of what earlier layers changed: 93.7 -> 68.5 with 16,384 calibration tokens.

The ridge is relative to the mean diagonal of the features' Gram and scaled by ``features / tokens``: with few
tokens the regression over-fits (SmolLM2, 576 features; 4096 tokens: 177 at a relative ridge of 1e-3, 86 at 0.03,
79 at 0.1, 108 at 1.0; 16,384 tokens: 68.5 at 0.01, 69.5 at 0.03, 72.7 at 0.1; measured with a script of the same
computation while choosing it), and the best relative ridge shrinks as tokens grow. ``RIDGE_SCALE`` 0.5 gives 0.07
and 0.018 there (78.8 and 68.8 through this module).

What it needs: transformers' eager attention (the probabilities ``a``), which it switches to for the calibration
and switches back from, and a layer list it can run one layer at a time (every decoder this package converts).
It runs the original and the converted stack side by side, so it holds two copies of the calibration's hidden
states, one layer's output-projection outputs for all tokens, and one batch's attention probabilities
(``heads x T x T`` floats: rows of 512 tokens keep that small; a 4096-token row of a 64-head model is 4 GiB). It
costs about three calibration passes (the original layer once, the converted layer twice): SmolLM2-135M, 16,384
tokens, one thread: 170 s against fit's 34 s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..progress import progress
from .calibrate import (
    _as_batches,
    _Moments,
    _call_layer,
    _capture_layer_inputs,
    _resolve_compute_dtype,
    _RunIn,
    _tokens,
    decoder_layers,
    input_device,
    return_freed_memory,
)
from .projections import _param, applied

logger = logging.getLogger(__name__)

#: relative ridge = RIDGE_SCALE x features / tokens (see the module docstring for the measurements behind it).
RIDGE_SCALE = 0.5
#: attention implementations whose eager twin computes the same function (refit reads probabilities from eager).
STOCK_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

#: ``fit_block(i, cov, value_cov) -> (assignments, run_assignments) or None``: module ``i``'s new parameters from its
#: statistics, and what its layer runs as under eager attention (the same, or K/V repeated to the old head count
#: where eager does not repeat them itself).
FitBlock = Callable[[int, torch.Tensor, torch.Tensor], "tuple[dict, dict] | None"]


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)


def mixed_second_moment(x: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i mean_h m_hi m_hi^T`` with ``m_hi = sum_j probs[h, i, j] [x_j, 1]``: the attention-mixed inputs' sum.

    Args:
        x: one batch's attention input ``(b, T, E)``.
        probs: its attention probabilities ``(b, H, T, T)`` (queries by keys).
        keep: flat ``(b*T,)`` bool of the query positions to count (padding excluded); None = all.

    Returns:
        ``(E+1, E+1)`` float64 sum over the kept queries (divide by their number for the mean).
    """
    xa = _augment(x.float())  # mixing in float32: the (T, T) x (T, E) products dominate the cost
    heads = probs.shape[1]
    acc = torch.zeros(xa.shape[-1], xa.shape[-1], dtype=torch.float64, device=xa.device)
    for h in range(heads):  # one head at a time: a (b*T, E+1) float64 block, not (b, H, T, E+1) (1 GiB at 70B)
        flat = (probs[:, h].float() @ xa).reshape(-1, xa.shape[-1])
        if keep is not None:
            flat = flat[keep.to(flat.device)]
        flat = flat.double()
        acc += flat.mT @ flat
    return acc / heads


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, tokens: int, scale: float = RIDGE_SCALE) -> torch.Tensor:
    """``argmin_W |F W - Y|^2 + lam |W|^2`` from ``gram = F^T F`` and ``cross = F^T Y``; ``lam`` as documented above.

    Returns:
        ``W`` ``(features, outputs)`` float64.
    """
    n = gram.shape[0]
    lam = scale * n / max(tokens, 1) * float(gram.diagonal().mean().clamp_min(1e-30))
    return torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype, device=gram.device), cross)


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Run ``model`` with transformers' eager attention inside the block (the probabilities are returned there)."""
    previous = getattr(model.config, "_attn_implementation", None) or "eager"
    if previous not in STOCK_ATTENTION:
        raise ValueError(
            f"strategy 'refit' reads attention probabilities from transformers' eager attention, but this model runs "
            f"{previous!r}; convert the unconverted model (attention one of {', '.join(STOCK_ATTENTION)})"
        )
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class _Teacher:
    """Hooks on one ORIGINAL layer's attention module and output projection: ``E[x x^T]``, the mixed moment and the
    output projection's output per batch (the regression's targets)."""

    def __init__(self, module: nn.Module, out_proj: nn.Module) -> None:
        self.moments = _Moments(1)  # E[x x^T] exactly as fit's calibration accumulates it
        self.mixed: torch.Tensor | None = None
        self.targets: list[torch.Tensor] = []
        self.keep: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self.handles = [
            module.register_forward_pre_hook(self.moments.hook(0), with_kwargs=True),
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post),
            out_proj.register_forward_hook(self._target),
        ]

    def _pre(self, _m, args, kwargs):
        self._x = kwargs.get("hidden_states", args[0] if args else None).detach()

    def _post(self, _m, _args, output):
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
            raise ValueError("strategy 'refit': the attention module returned no probabilities under eager attention")
        m = mixed_second_moment(self._x, probs, self.keep)
        self.mixed = m if self.mixed is None else self.mixed + m
        self._x = None

    def _target(self, _m, _args, output):
        y = output.detach().reshape(-1, output.shape[-1])
        self.targets.append(y if self.keep is None else y[self.keep.to(y.device)])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Features(Exception):
    """Raised by the feature hook once the output projection's input is taken: ends that layer call early."""


def refit_output(out_proj: nn.Module, transposed: bool, layer: nn.Module, states: list[torch.Tensor], rests: list,
                 keeps: list, targets: list[torch.Tensor], tokens: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The ridge solution for ``out_proj`` given the (converted) layer's features on ``states``.

    Returns:
        The new weight in ``out_proj``'s own layout, or ``(weight, bias)`` when it has a bias.
    """
    has_bias = getattr(out_proj, "bias", None) is not None
    acc: dict[str, torch.Tensor] = {}
    b_idx = [0]

    def pre(_m, args):
        f = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        keep = keeps[b_idx[0]]
        if keep is not None:
            f = f[keep.to(f.device)]
        if has_bias:
            f = _augment(f)
        y = targets[b_idx[0]].double().to(f.device)
        g, c = f.mT @ f, f.mT @ y
        acc["g"] = g if "g" not in acc else acc["g"] + g
        acc["c"] = c if "c" not in acc else acc["c"] + c
        raise _Features  # the rest of the layer (its MLP) is not needed for the features

    h = out_proj.register_forward_pre_hook(pre)
    try:
        for b, (hidden, rest) in enumerate(zip(states, rests)):
            b_idx[0] = b
            try:
                _call_layer(layer, hidden, rest)
            except _Features:
                pass
    finally:
        h.remove()
    w = ridge_solve(acc["g"].cpu(), acc["c"].cpu(), tokens)  # (features[+1], E_out)
    weight, bias = (w[:-1], w[-1]) if has_bias else (w, None)
    weight = weight if transposed else weight.mT  # Conv1D stores (in, out); Linear (out, in)
    return weight if bias is None else (weight, bias)  # float64: _param casts them to the old tensors' dtype


@torch.no_grad()
def refit_layers(
    model: nn.Module,
    modules: list[nn.Module],
    out_projs: list[tuple[nn.Module, bool]],
    calibration: Any,
    fit_block: FitBlock,
    *,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | str | None = "auto",
) -> tuple[list[dict | None], int]:
    """Run ``refit`` over ``modules`` (one per layer) without changing the model; return each module's assignments.

    For each layer in order: the ORIGINAL layer runs on the original stack's hidden states (statistics and the
    output projection's outputs), ``fit_block`` computes the module's new parameters, the converted layer runs (its
    parameters applied only while it runs) on the converted stack's hidden states, its output projection is re-solved
    and added to the assignments, and the converted layer advances the converted stack. Nothing stays written to
    the model: the caller commits the assignments.

    Args:
        model: the unconverted model.
        modules: its attention modules to convert, in layer order, each inside a different layer of one list.
        out_projs: per module, its output projection and whether it stores its weight ``(in, out)`` (GPT-2 Conv1D).
        calibration: input ids ``(n, L)``, a dict of model inputs or a list of such dicts.
        fit_block: module index, ``E[x x^T]`` and the mixed moment (both ``(E+1, E+1)``) -> new assignments.

    Returns:
        (assignments per module, output projection included, or None where the module is unchanged; tokens seen)
    """
    layers = decoder_layers(model, modules)
    if layers is None:
        raise ValueError(f"strategy 'refit' runs the model one layer at a time; {type(model).__name__} has no layer "
                         "list holding its attention modules one per layer: use strategy='fit'")
    device = torch.device(device) if device is not None else input_device(model)
    layer_of = {}
    for i, m in enumerate(modules):
        layer_of[i] = next(j for j, layer in enumerate(layers) if any(x is m for x in layer.modules()))
    by_layer = {j: i for i, j in layer_of.items()}
    last = max(layer_of.values())
    batches = list(_as_batches(calibration))
    counted = [_tokens(b) for b in batches]
    keeps = [k for _, k in counted]
    tokens = sum(n for n, _ in counted)
    if tokens == 0:
        raise ValueError("calibration produced no activations: pass at least one non-empty batch of input ids")
    results: list[dict | None] = [None] * len(modules)
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model):
            run_dtype = _resolve_compute_dtype(model, device, compute_dtype)
            states, calls = _capture_layer_inputs(model, layers, last, batches, device, run_dtype)
            student = list(states)  # the converted stack starts from the same embeddings
            for j in progress(range(last + 1), desc="refit, layer by layer", unit="layer"):
                rests = [calls[b][j] for b in range(len(batches))]
                i = by_layer.get(j)
                teacher = _Teacher(modules[i], out_projs[i][0]) if i is not None else None
                try:
                    with _RunIn(layers[j], run_dtype):
                        for b in range(len(batches)):
                            if teacher is not None:
                                teacher.keep = teacher.moments.mask = keeps[b]
                            states[b] = _call_layer(layers[j], states[b], rests[b])
                finally:
                    if teacher is not None:
                        teacher.remove()
                blocks = None
                if teacher is not None:
                    blocks = fit_block(i, teacher.moments.take(0, tokens), teacher.mixed / tokens)
                if blocks is not None:
                    block, run = blocks
                    out_proj, transposed = out_projs[i]
                    with applied(run), _RunIn(layers[j], run_dtype):
                        new = refit_output(out_proj, transposed, layers[j], student, rests, keeps, teacher.targets,
                                           tokens)
                    weight, bias = new if isinstance(new, tuple) else (new, None)
                    solved = {(id(out_proj), "weight"): (out_proj, "weight", _param(weight, out_proj.weight))}
                    if bias is not None:
                        solved[(id(out_proj), "bias")] = (out_proj, "bias", _param(bias, out_proj.bias))
                    results[i] = {**block, **solved}
                    with applied({**run, **solved}), _RunIn(layers[j], run_dtype):
                        student = [_call_layer(layers[j], h, r) for h, r in zip(student, rests)]
                else:
                    with _RunIn(layers[j], run_dtype):
                        student = [_call_layer(layers[j], h, r) for h, r in zip(student, rests)]
                for b in range(len(batches)):
                    calls[b][j] = None
                del teacher
                return_freed_memory()
    finally:
        model.train(was_training)
    logger.debug("refit: %d tokens through %d attention modules", tokens, len(modules))
    return results, tokens
