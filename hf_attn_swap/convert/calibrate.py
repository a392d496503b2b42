"""Calibration statistics: second moments of what each attention module reads, on real text.

Two ways to collect the same statistics:

- :func:`layerwise_second_moments` (the default where it applies): run the embedding once, keep the hidden states of
  the calibration tokens, then push them through one decoder layer at a time (GPTQ-style). Each layer's weights are
  used once for all batches, which is what makes offloaded models (accelerate ``device_map`` / ``cpu_offload``) cheap
  to calibrate: a whole-model forward per batch would page every layer in once per batch. Peak memory beyond the
  weights is the carried hidden states (``n_tokens x hidden``) plus one layer's working set.
- :func:`input_second_moments`: one whole-model forward per batch with hooks (the original path, kept as the fallback
  for models whose layer stack cannot be found).

On the CPU a bfloat16/float16 model is calibrated with each layer run in float32 (the layer is upcast while it runs and its
original tensors are put back): most CPUs have no native bfloat16 matmul, and torch's fallback measured 80x
slower than float32 here (0.18 vs 14 GFLOP/s, one thread, AMD EPYC without avx512_bf16). On a GPU the layers run in
the model's dtype. ``compute_dtype`` overrides either choice.

Both read every layer's input from the ORIGINAL model (nothing is converted until all statistics are collected), so
they give the same numbers. Batches run on the model's device and in its dtype; the sums ``X^T X`` are accumulated in
float64 on the device the activations live on (no ``n_tokens x hidden`` copy to the CPU per layer; a GPU's float64
matmul on a ``(tokens, E)`` block is still far cheaper than the transfer) and returned on that device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..progress import progress

logger = logging.getLogger(__name__)

#: ``consume(module_index, second_moment) -> anything``: called as soon as a module's statistic is final.
Consumer = Callable[[int, torch.Tensor], Any]


#: Tokens per forward batch when the calibration is a tensor of ids (whole rows; a longer row is a batch alone). A
#: batch's activations are what calibration holds beyond the carried hidden states, so this bounds them: in float32
#: one layer's MLP of a 0.36B llama on 512 tokens is 3 x 5.5 MiB, against 22 MiB for the 2048 tokens four rows held.
BATCH_TOKENS = 512


def _as_batches(calibration: Any) -> Iterable[dict[str, torch.Tensor]]:
    if isinstance(calibration, torch.Tensor):
        ids = calibration if calibration.dim() == 2 else calibration[None]
        for row in ids.split(max(1, BATCH_TOKENS // max(1, ids.shape[1]))):
            yield {"input_ids": row}
    elif isinstance(calibration, dict):
        yield calibration
    elif isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], dict):
        yield from calibration
    else:
        raise TypeError(
            "calibration must be a LongTensor of input ids (n, L), a dict of model inputs, or a list of such dicts; "
            f"got {type(calibration).__name__}"
        )


def input_device(model: nn.Module) -> torch.device:
    """Where the model reads its input ids: the input embedding's device (its accelerate execution device when the
    weights are offloaded to ``meta``)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        hook = getattr(emb, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        if emb.weight.device.type != "meta":
            return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op without glibc).

    Calibrating a layer frees everything it allocated (its float32 copy, activations, the fit's float64 temporaries),
    but glibc keeps freed blocks below its self-raising mmap threshold in the heap, and the next layer's allocations,
    of other sizes, reuse only part of them: on a 0.36B bf16 llama the process's RSS crept up by 0.2 GiB over 26
    layers (0.3 x the weights) without this call after each layer, which costs about a millisecond.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class _Moments:
    """Running ``sum x x^T`` (float64, with a constant-1 coordinate) of each watched module's input."""

    n: int
    sums: list[torch.Tensor | None] = field(default_factory=list)
    mask: torch.Tensor | None = None  # flat keep-mask of the current batch (padding excluded)

    def __post_init__(self) -> None:
        self.sums = [None] * self.n

    def hook(self, i: int):
        def pre_hook(_mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            x = x.detach().reshape(-1, x.shape[-1]).double()
            if self.mask is not None:
                x = x[self.mask.to(x.device)]
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
            acc = x.mT @ x
            self.sums[i] = acc if self.sums[i] is None else self.sums[i] + acc

        return pre_hook

    def take(self, i: int, tokens: int) -> torch.Tensor:
        """Module ``i``'s finished ``E[x x^T]``; its running sum is released."""
        if tokens == 0 or self.sums[i] is None:
            raise ValueError("calibration produced no activations: pass at least one non-empty batch of input ids")
        mean, self.sums[i] = self.sums[i] / tokens, None
        return mean

    def result(self, tokens: int, consume: Consumer | None) -> tuple[list[Any], int]:
        out = [self.take(i, tokens) for i in range(self.n)]
        # DEBUG: the swap that calibrates logs one INFO line itself (the token count is in its record).
        logger.debug("calibration: %d tokens through %d attention modules", tokens, self.n)
        return ([consume(i, c) for i, c in enumerate(out)] if consume else out), tokens


def _tokens(batch: dict[str, Any]) -> tuple[int, torch.Tensor | None]:
    mask = batch.get("attention_mask")
    keep = None if mask is None else mask.reshape(-1).bool()
    return int(batch["input_ids"].numel() if mask is None else mask.sum()), keep


@torch.no_grad()
def input_second_moments(
    model: nn.Module,
    modules: list[nn.Module],
    calibration: Any,
    *,
    device: torch.device | str | None = None,
    consume: Consumer | None = None,
) -> tuple[list[Any], int]:
    """``E[x x^T]`` of each module's input ``hidden_states``, with a trailing constant-1 coordinate (whole-model path).

    The extra coordinate lets the fit treat biases as weights of a constant input. Padding positions (where an
    ``attention_mask`` in the batch is 0) are excluded.

    Args:
        model: the model, on any device and in any dtype (the forward runs in the model's dtype).
        modules: attention modules whose inputs are measured.
        calibration: input ids ``(n, L)``, a dict of model inputs or a list of such dicts.
        device: where the batches go; default :func:`input_device`.
        consume: if given, applied to each module's matrix once all are collected; its results are returned instead.

    Returns:
        (one ``(E+1, E+1)`` float64 matrix per module, on the activations' device; number of tokens seen)
    """
    device = torch.device(device) if device is not None else input_device(model)
    moments = _Moments(len(modules))
    tokens = 0
    handles = [m.register_forward_pre_hook(moments.hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        for batch in progress(list(_as_batches(calibration)), desc="calibration", unit="batch"):
            n, moments.mask = _tokens(batch)
            tokens += n
            model(**_to(batch, device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return moments.result(tokens, consume)


class _Captured(Exception):
    """Raised by the capture stub of the last needed layer: the rest of the forward is not needed."""


def decoder_layers(model: nn.Module, modules: list[nn.Module]) -> nn.ModuleList | None:
    """The model's stack of layers: the ``ModuleList`` each of whose elements holds exactly one of ``modules``.

    Returns None where no such list exists (then only the whole-model path applies).
    """
    wanted = {id(m) for m in modules}
    for lst in model.modules():
        if not isinstance(lst, nn.ModuleList) or len(lst) == 0:
            continue
        counts = [sum(id(m) in wanted for m in layer.modules()) for layer in lst]
        if all(c <= 1 for c in counts) and sum(counts) == len(wanted):
            return lst
    return None


def _resolve_compute_dtype(model: nn.Module, device: torch.device, compute_dtype: Any) -> torch.dtype | None:
    """The dtype layers run in during layer-by-layer calibration; None = the model's own."""
    if compute_dtype is None:
        return None
    if compute_dtype != "auto":
        return compute_dtype
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return None


def _cast_floats(value: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors inside captured args (hidden states, rotary tables, float masks) cast to ``dtype``."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


class _RunIn:
    """Context: a layer's floating parameters and buffers upcast to ``dtype`` while it runs, then put back.

    The original tensors are restored (not cast back), so the model ends bit-identical and holds no extra copy. Offloaded (``meta``)
    layers are left alone: their weights are paged in by accelerate in their stored dtype.
    """

    def __init__(self, layer: nn.Module, dtype: torch.dtype | None) -> None:
        self.layer, self.dtype, self.saved = layer, dtype, {}

    def __enter__(self) -> None:
        if self.dtype is None or any(t.device.type == "meta" for t in self.layer.parameters()):
            return
        for t in (*self.layer.parameters(), *self.layer.buffers()):
            if t.is_floating_point() and t.dtype != self.dtype:
                # Keep the original storage and put it back afterwards: a cast back would allocate a second copy
                # of every layer's weights (and leave the loaded, memory-mapped pages resident beside it).
                self.saved[t] = t.data
                t.data = t.data.to(self.dtype)

    def __exit__(self, *exc: Any) -> None:
        for t, original in self.saved.items():
            t.data = original
        self.saved.clear()


@torch.no_grad()
def _capture_layer_inputs(model, layers, last: int, batches, device, dtype: torch.dtype | None = None):
    """For every batch: layer 0's hidden states and, for each layer ``<= last``, the other args/kwargs the model passes.

    Each layer's forward is temporarily replaced by a stub that records its call and returns the hidden states
    unchanged (transformers 5.x layers return a tensor), and the stub of layer ``last`` stops the forward. Only the
    embedding and the mask/position computations run; the per-layer calls are captured separately because some
    models pass different masks or rotary tables to different layers (Gemma 3, sliding-window Qwen 3). With ``dtype``
    the embedding's output is cast first, so the rotary tables and masks the model derives from it are built in that
    dtype (as a model loaded in that dtype would build them).
    """
    calls: list[list[tuple[tuple, dict]]] = []  # [batch][layer] -> (args, kwargs) with the hidden states cut out
    states: list[torch.Tensor] = []
    saved = [layer.__dict__.get("forward") for layer in layers]  # accelerate keeps its hooked forward here

    def stub(j: int):
        def forward(*args, **kwargs):
            if "hidden_states" in kwargs:
                hidden = kwargs.pop("hidden_states")
                rest = (args, kwargs, "kw")
            else:
                hidden, rest = args[0], (args[1:], kwargs, "pos")
            if j == 0:
                states.append(_cast_floats(hidden, dtype))
            calls[-1].append(_cast_floats(rest, dtype))
            if j == last:
                raise _Captured
            return hidden

        return forward

    emb = model.get_input_embeddings() if dtype is not None and hasattr(model, "get_input_embeddings") else None
    cast = emb.register_forward_hook(lambda _m, _a, out: _cast_floats(out, dtype)) if emb is not None else None
    try:
        for j in range(last + 1):
            layers[j].forward = stub(j)
        for batch in batches:
            calls.append([])
            try:
                model(**_to(batch, device), use_cache=False)
            except _Captured:
                pass
            else:
                raise RuntimeError("layer-by-layer calibration: the model's forward never reached its last layer")
    finally:
        if cast is not None:
            cast.remove()
        for layer, fwd in zip(layers[: last + 1], saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
    return states, calls


def _call_layer(layer: nn.Module, hidden: torch.Tensor, rest: tuple) -> torch.Tensor:
    args, kwargs, how = rest
    out = layer(*args, hidden_states=hidden, **kwargs) if how == "kw" else layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # 4.x-style layers return a tuple


@torch.no_grad()
def layerwise_second_moments(
    model: nn.Module,
    modules: list[nn.Module],
    calibration: Any,
    *,
    device: torch.device | str | None = None,
    consume: Consumer | None = None,
    compute_dtype: torch.dtype | str | None = "auto",
) -> tuple[list[Any], int]:
    """The same statistics as :func:`input_second_moments`, computed one decoder layer at a time.

    The hidden states entering the first layer are kept for all calibration tokens (on the device they are produced
    on) and each layer, in order, reads them, feeds its attention module's input to the accumulator, and replaces them
    with its output: layer ``i+1`` always sees the ORIGINAL layer ``i``'s output, as in the whole-model path. Layers
    after the last watched module are never run. Each layer runs through its own ``__call__``, so accelerate hooks
    (``device_map``, ``cpu_offload``) move its weights in and out once for all batches.

    Args:
        model: the model (any device/dtype, accelerate-dispatched or not).
        modules: attention modules whose inputs are measured, each inside a different element of one layer list.
        calibration: input ids ``(n, L)``, a dict of model inputs or a list of such dicts.
        device: where the batches go; default :func:`input_device`.
        consume: if given, called with each module's matrix as soon as its layer is done, and the matrix is dropped:
            only one ``(E+1, E+1)`` float64 matrix is alive at a time (28 of them are 2 GiB for a 3B model). Its
            results are returned instead of the matrices.
        compute_dtype: dtype the layers run in: ``"auto"`` (float32 for a bfloat16/float16 model on the CPU, else the
            model's dtype; see the module docstring), None (the model's dtype) or a ``torch.dtype``.

    Returns:
        (one ``(E+1, E+1)`` float64 matrix per module, on the activations' device, or ``consume``'s result for it;
        number of tokens seen)

    Raises:
        ValueError: the model has no layer list holding the modules one per layer (use :func:`input_second_moments`),
            or the calibration is empty.
    """
    layers = decoder_layers(model, modules)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: no layer list holds the attention modules one per layer; "
            "use the whole-model calibration (input_second_moments)"
        )
    device = torch.device(device) if device is not None else input_device(model)
    owner = {id(m): i for i, m in enumerate(modules)}
    layer_of = {}
    for j, layer in enumerate(layers):
        for m in layer.modules():
            if id(m) in owner:
                layer_of[owner[id(m)]] = j
    last = max(layer_of.values())
    batches = list(_as_batches(calibration))
    moments = _Moments(len(modules))
    results: list[Any] = [None] * len(modules)
    counted = [_tokens(b) for b in batches]
    tokens = sum(n for n, _ in counted)
    if tokens == 0:
        raise ValueError("calibration produced no activations: pass at least one non-empty batch of input ids")
    was_training = model.training
    model.eval()
    try:
        run_dtype = _resolve_compute_dtype(model, device, compute_dtype)
        if run_dtype is not None:
            logger.debug("calibration: layers run in %s", run_dtype)
        states, calls = _capture_layer_inputs(model, layers, last, batches, device, run_dtype)
        for j in progress(range(last + 1), desc="calibration, layer by layer", unit="layer"):
            watched = [i for i, lj in layer_of.items() if lj == j]
            handles = [modules[i].register_forward_pre_hook(moments.hook(i), with_kwargs=True) for i in watched]
            try:
                with _RunIn(layers[j], run_dtype):
                    for b in range(len(batches)):
                        moments.mask = counted[b][1]
                        rest = calls[b][j]
                        calls[b][j] = None  # this layer's kwargs are not needed again
                        out = _call_layer(layers[j], states[b], rest)
                        # The last layer's output feeds nothing: only its attention input is needed.
                        states[b] = out if j < last else None
            finally:
                for h in handles:
                    h.remove()
            # Layer j's output was computed above with its original weights, so whatever consume does with its
            # statistic cannot change what later layers see.
            for i in watched:
                results[i] = consume(i, moments.take(i, tokens)) if consume else moments.take(i, tokens)
            return_freed_memory()  # this layer's temporaries (and its fit's, in consume) are all freed by now
            logger.debug("layer-by-layer calibration: layer %d of %d done", j + 1, last + 1)
    finally:
        model.train(was_training)
    logger.debug("calibration: %d tokens through %d attention modules, layer by layer", tokens, len(modules))
    return results, tokens


def second_moments(
    model: nn.Module,
    modules: list[nn.Module],
    calibration: Any,
    *,
    method: str = "auto",
    device: torch.device | str | None = None,
    consume: Consumer | None = None,
    compute_dtype: torch.dtype | str | None = "auto",
) -> tuple[list[Any], int]:
    """Attention-input second moments by the layer-by-layer path where it applies, else the whole-model path.

    Args:
        model, modules, calibration, device, consume, compute_dtype: see :func:`layerwise_second_moments`
            (``compute_dtype`` applies to the layer-by-layer path only; the whole-model path runs in the model's
            dtype).
        method: ``auto`` (layer-by-layer when the model's layer list is found, naming the fallback otherwise),
            ``layerwise`` or ``whole``.
    """
    if method not in ("auto", "layerwise", "whole"):
        raise ValueError(f"unknown calibration method {method!r}; allowed: auto, layerwise, whole")
    if method == "whole":
        return input_second_moments(model, modules, calibration, device=device, consume=consume)
    if method == "auto" and decoder_layers(model, modules) is None:
        logger.info(
            "calibration: %s has no layer list holding one attention module per layer; using the whole-model path",
            type(model).__name__,
        )
        return input_second_moments(model, modules, calibration, device=device, consume=consume)
    return layerwise_second_moments(
        model, modules, calibration, device=device, consume=consume, compute_dtype=compute_dtype
    )
