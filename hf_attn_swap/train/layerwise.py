"""Per-layer attention-output matching: train each student attention module on the teacher's own inputs.

Every attention module of the student is fed the hidden states the *teacher's* corresponding module received, and a
few of its parameters are trained (Adam, MSE) to reproduce the teacher module's output. Layers are independent, so
there is no backpropagation through the network: on a CPU this is one to two orders of magnitude cheaper per token
than end-to-end training, and it is what LoLCATs calls attention transfer (stage 1). After a GQA/MQA conversion it
starts from the converted weights (``strategy="fit"`` is the best start) and trains Q/K/V/O per layer.

``trainable="block"`` matches whole decoder layers instead: each student layer (attention, MLP and norms) is trained
on the teacher layer's input to reproduce what the teacher layer adds to the residual stream, so the layer's MLP can
make up for some of what the converted attention no longer computes, still without backpropagation across layers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..api import attention_sites, parse_layers, swap_record
from ..hf_compat import CACHE_KWARGS
from ..progress import progress as progress_bar
from .precision import autocast

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (only the first module's kwargs are needed)."""


@dataclass
class LayerStat:
    """Attention-output MSE of one layer before and after training (on the calibration inputs); with
    ``trainable="block"``, the decoder layer's output MSE.

    ``rel_*`` divides by the mean square of the teacher's output (block: of what the teacher layer adds to its input):
    0 = exact, 1 = as bad as outputting zeros (block: as bad as adding nothing).
    """

    layer: int
    mse_before: float
    mse_after: float
    rel_before: float
    rel_after: float
    #: the process (``accelerate`` rank) that trained this layer; 0 in a single-process run.
    rank: int = 0


@dataclass
class LayerwiseResult:
    """What :func:`layerwise_transfer` did."""

    layers: list[LayerStat] = field(default_factory=list)
    tokens: int = 0
    steps_per_layer: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def mean_rel_before(self) -> float:
        return sum(s.rel_before for s in self.layers) / max(len(self.layers), 1)

    @property
    def mean_rel_after(self) -> float:
        return sum(s.rel_after for s in self.layers) / max(len(self.layers), 1)


def check_transferable(student: nn.Module, teacher: nn.Module, layers: list[int] | None = None) -> list[int]:
    """Validate that every selected student attention module has a teacher counterpart with an output to match.

    Returns:
        The selected layer indices.

    Raises:
        ValueError: different layer counts or hidden sizes, or an attention module without a tensor output.
    """
    s_sites, t_sites = attention_sites(student), attention_sites(teacher)
    if len(s_sites) != len(t_sites):
        raise ValueError(
            f"attention transfer needs one teacher attention module per student module; the student has "
            f"{len(s_sites)} and the teacher {len(t_sites)}"
        )
    for name in ("hidden_size", "vocab_size"):
        a, b = getattr(student.config, name, None), getattr(teacher.config, name, None)
        if a != b:
            raise ValueError(f"teacher and student differ in {name} ({b} vs {a}): use the unconverted model as teacher")
    return parse_layers(layers, len(s_sites))


#: submodule holding a linear variant's learned feature map (hedgehog) on an attention module.
FEATURE_MAP_ATTR = "hf_attn_swap_feature_map"


def module_parameters(module: nn.Module, which: str, adapter_k: str = "k_proj", adapter_v: str = "v_proj") -> list[nn.Parameter]:
    """Parameters of one attention module selected by ``which``: ``attention`` (all of them), ``kv`` (the K/V
    projections) or ``feature_map`` (a linear variant's learned feature map, e.g. hedgehog)."""
    if which in ("attention", "all"):
        return [p for p in module.parameters() if p.dtype.is_floating_point]
    heads = {"kv": (adapter_k, adapter_v), "feature_map": (FEATURE_MAP_ATTR,)}.get(which)
    if heads is None:
        raise ValueError(f"unknown layerwise trainable {which!r} for an attention module; allowed: attention, kv, "
                         "feature_map (block trains whole decoder layers: layerwise_transfer)")
    return [p for n, p in module.named_parameters() if n.split(".")[0] in heads and p.dtype.is_floating_point]


def _batches(ids: torch.Tensor, rows: int) -> list[torch.Tensor]:
    n = ids.shape[0] - ids.shape[0] % rows
    if n == 0:
        raise ValueError(f"layerwise transfer needs at least {rows} calibration rows; got {ids.shape[0]}")
    return list(ids[:n].split(rows))


def _run_hooked(teacher: nn.Module, batches: list[torch.Tensor], handles: list, mixed_precision: str) -> None:
    """Run the teacher (eval mode) over every batch for the hooks in ``handles`` to record, then remove them."""
    was = teacher.training
    teacher.eval()
    try:
        for b in batches:
            with autocast(mixed_precision, b.device):
                teacher(input_ids=b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        teacher.train(was)


class _Rows:
    """One captured tensor per layer, ``(n_rows, L, E)`` float32, filled batch by batch.

    The tensor is allocated once, at the first batch, and each batch is copied into its rows. Keeping the batches in
    a list and concatenating them at the end would hold every activation twice at the peak (the list and the
    concatenation): about 20 GB instead of 10 for 72k tokens of SmolLM2's 30 layers, inputs and outputs, which is
    where a 24 GB machine ran out of memory.
    """

    def __init__(self, n_rows: int) -> None:
        self.n_rows, self.filled, self.data = n_rows, 0, None

    def add(self, t: torch.Tensor) -> None:
        if self.data is None:
            self.data = torch.empty((self.n_rows, *t.shape[1:]), dtype=torch.float32, device=t.device)
        n = t.shape[0]
        self.data[self.filled:self.filled + n].copy_(t.detach())  # copy_ casts to float32
        self.filled += n

    def tensor(self) -> torch.Tensor:
        if self.data is None or self.filled != self.n_rows:
            raise RuntimeError(f"captured {self.filled} of {self.n_rows} rows: a hooked module did not run on every "
                               "row")
        return self.data


def capture_bytes(tokens: int, width: int, n_layers: int, inputs: str = "teacher") -> int:
    """Memory the per-layer stage keeps for ``n_layers`` layers: each layer's output (and, with the teacher's inputs,
    its input) for ``tokens`` tokens of ``width`` features in float32; with ``inputs="student"`` one set of the
    student's own hidden states instead of every layer's inputs."""
    tensors = 2 * n_layers if inputs == "teacher" else n_layers + 1
    return tokens * width * 4 * tensors


def hidden_width(model: nn.Module) -> int:
    """Width of the hidden states the attention modules read and write (the text config's ``hidden_size``)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    width = getattr(cfg, "hidden_size", None)
    return int(width) if width else int(model.get_input_embeddings().embedding_dim)


#: share of the free memory the captured activations may take: the rest is for the training steps beside them.
CAPTURE_SHARE = 0.9


def check_capture_fits(tokens: int, width: int, n_layers: int, device: torch.device, inputs: str = "teacher") -> int:
    """Refuse, before anything is captured, a per-layer stage whose kept activations exceed the free memory.

    Returns:
        The bytes :func:`capture_bytes` expects.

    Raises:
        ValueError: one line with what it needs, what is free, and the most tokens that would fit.
    """
    from ..preflight import available_bytes

    need, free = capture_bytes(tokens, width, n_layers, inputs), available_bytes(device)
    if need > CAPTURE_SHARE * free:
        per_token = capture_bytes(1, width, n_layers, inputs)
        raise ValueError(
            f"the per-layer stage would keep {need / 2**30:.1f} GiB of teacher activations ({tokens} tokens x "
            f"{width} features x {n_layers} layers, {'inputs and outputs' if inputs == 'teacher' else 'outputs'}, "
            f"float32) but {free / 2**30:.1f} GiB is free on {device.type}; lower layerwise_tokens to at most "
            f"{int(CAPTURE_SHARE * free // per_token)} or train fewer layers")
    return need


@torch.no_grad()
def capture_teacher(teacher: nn.Module, batches: list[torch.Tensor], layers: list[int], mixed_precision: str = "no",
                    keep_inputs: bool = True) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
    """Run the teacher and keep each selected attention module's input hidden states and output (float32).

    ``mixed_precision="bf16"`` runs the teacher's products in bfloat16 (:mod:`hf_attn_swap.train.precision`); what
    is kept is still stored in float32.

    Returns:
        ``(inputs, outputs)``: one tensor ``(n_rows, L, E)`` per selected layer each (``inputs`` None without
        ``keep_inputs``).
    """
    sites = attention_sites(teacher)
    n_rows = sum(b.shape[0] for b in batches)
    ins = {i: _Rows(n_rows) for i in layers}
    outs = {i: _Rows(n_rows) for i in layers}
    handles = []
    for i in layers:
        def hook(_m, args, kwargs, output, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = output[0] if isinstance(output, tuple) else output
            if not isinstance(y, torch.Tensor):
                raise ValueError(f"teacher attention layer {i} returned no output tensor to transfer")
            if keep_inputs:
                ins[i].add(x)
            outs[i].add(y)

        handles.append(sites[i].module.register_forward_hook(hook, with_kwargs=True))
    _run_hooked(teacher, batches, handles, mixed_precision)
    return ([ins[i].tensor() for i in layers] if keep_inputs else None), [outs[i].tensor() for i in layers]


class _StudentStack:
    """The student's own hidden states, advanced one decoder layer at a time (``inputs="student"``).

    Layer ``i``'s attention module is trained on what the student's layers before it (already trained) feed it, so it
    learns to correct their remaining error as well as its own: the same idea as ``refit``'s sequential output
    regression (``hf_attn_swap.convert.refit``), by gradient steps.
    """

    def __init__(self, student: nn.Module, sites: list, batches: list[torch.Tensor], last: int) -> None:
        from ..convert.calibrate import _capture_layer_inputs, decoder_layers

        self.sites = sites
        self.layers = decoder_layers(student, [s.module for s in sites])
        if self.layers is None:
            raise ValueError(f"layerwise inputs='student' runs the model one layer at a time; {type(student).__name__} "
                             "has no layer list holding its attention modules one per layer: use inputs='teacher'")
        self.states, self.calls = _capture_layer_inputs(student, self.layers, last, [{"input_ids": b} for b in batches],
                                                        _device(student))
        self.done = 0  # layers the states have been advanced through

    @torch.no_grad()
    def inputs_of(self, i: int) -> torch.Tensor:
        """Attention module ``i``'s input on every row, from the student's layers ``< i`` as they are now."""
        from ..convert.calibrate import _call_layer

        for j in range(self.done, i):
            self.states = [_call_layer(self.layers[j], h, c[j]) for h, c in zip(self.states, self.calls)]
        self.done = i
        got: list[torch.Tensor] = []

        def grab(_m, args, kwargs):
            got.append(kwargs.get("hidden_states", args[0] if args else None).detach().float())
            raise _Stop

        h = self.sites[i].module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for hidden, c in zip(self.states, self.calls):
                try:
                    _call_layer(self.layers[i], hidden, c[i])
                except _Stop:
                    pass
        finally:
            h.remove()
        return torch.cat(got)


@torch.no_grad()
def module_kwargs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments ``model`` passes its first attention module for ``input_ids`` (masks, RoPE tables).

    Only the embeddings and mask construction run: a hook stops the forward at the first attention module.
    """
    sites = attention_sites(model)
    seen: dict[str, Any] = {}

    def hook(_m, args, kwargs):
        seen.update({k: v for k, v in kwargs.items() if k != "hidden_states" and k not in CACHE_KWARGS})
        raise _Stop

    h = sites[0].module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return seen


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _module_out(module: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    # The teacher's activations are kept in float32; a half-precision student takes them in its own dtype, and its
    # output comes back in float32 so that the MSE is summed in float32.
    weight = next(module.parameters(), None)
    out = module(hidden_states=x if weight is None else x.to(weight.dtype), **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"attention module {type(module).__name__} returned no output tensor to transfer")
    return y.float()


def _fit(module: nn.Module, params: list[nn.Parameter], out: Callable[[torch.Tensor], torch.Tensor],
         x_all: torch.Tensor, y_all: torch.Tensor, *, layer: int, steps: int, lr: float, seed: int, batch_rows: int,
         mixed_precision: str, on_steps: Callable[[int, int, nn.Module], None] | None,
         on_steps_every: int, what: str, bar: Any) -> LayerStat:
    """Train ``params`` (Adam, cosine-decayed learning rate) so that ``out(x)`` reproduces ``y_all`` on random
    ``batch_rows``-row minibatches of ``x_all``; the MSE before and after on the first ``batch_rows`` rows, and both
    relative to the mean square of ``y_all``. Layer ``layer`` draws its rows from its own generator (``seed + layer``),
    so its result does not depend on which other layers are trained with it. Logs ``what``'s error and advances
    ``bar``."""
    scale = float(y_all.pow(2).mean().clamp_min(1e-30))
    probe = slice(0, batch_rows)
    with torch.no_grad():
        before = float((out(x_all[probe]) - y_all[probe]).pow(2).mean())
    if params:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        gen = torch.Generator().manual_seed(seed + layer)
        if on_steps is not None:
            with torch.no_grad():
                on_steps(layer, 0, module)
        for step in range(steps):
            rows = torch.randperm(x_all.shape[0], generator=gen)[:batch_rows]
            with autocast(mixed_precision, x_all.device):
                y = out(x_all[rows])  # float32 out: the loss is summed in float32
            loss = (y - y_all[rows]).pow(2).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_steps is not None and ((step + 1) % on_steps_every == 0 or step + 1 == steps):
                with torch.no_grad():
                    on_steps(layer, step + 1, module)
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        after = float((out(x_all[probe]) - y_all[probe]).pow(2).mean())
    logger.info("layer %d: %s MSE %.4g -> %.4g (relative %.4f -> %.4f)", layer, what, before, after, before / scale,
                after / scale)
    bar.update(1)
    bar.set_postfix(rel=f"{before / scale:.3f}->{after / scale:.3f}")
    return LayerStat(layer, before, after, before / scale, after / scale)


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (each holding one attention module), or a ValueError saying why not."""
    from ..convert.calibrate import decoder_layers

    layers = decoder_layers(model, [s.module for s in attention_sites(model)])
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no layer list holding its attention modules one per layer: "
                         "layerwise trainable='block' needs one (use trainable='attention')")
    return layers


@torch.no_grad()
def _capture_teacher_layers(teacher: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], idx: list[int],
                            mixed_precision: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each selected teacher decoder layer's input hidden states and output, ``(n_rows, L, E)`` float32 each."""
    n_rows = sum(b.shape[0] for b in batches)
    ins = {i: _Rows(n_rows) for i in idx}
    outs = {i: _Rows(n_rows) for i in idx}
    handles = []
    for i in idx:
        def pre(_m, args, kwargs, i=i):
            ins[i].add(kwargs.get("hidden_states", args[0] if args else None))

        def post(_m, args, kwargs, output, i=i):
            outs[i].add(output[0] if isinstance(output, tuple) else output)

        handles.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layers[i].register_forward_hook(post, with_kwargs=True))
    _run_hooked(teacher, batches, handles, mixed_precision)
    return [ins[i].tensor() for i in idx], [outs[i].tensor() for i in idx]


def _block_transfer(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], idx: list[int], *,
                    steps: int, lr: float, seed: int, progress: bool, on_steps: Callable[[int, int, nn.Module], None]
                    | None, on_steps_every: int, mixed_precision: str) -> LayerwiseResult:
    """``trainable="block"``: each student decoder layer trained (Adam, cosine learning rate) to reproduce the
    teacher layer's output on the teacher layer's input; the loss is the MSE of what the layer adds to its input (the
    residual stream passes through unchanged, and would otherwise dwarf the error), relative to the teacher's."""
    from ..convert.calibrate import _call_layer, _capture_layer_inputs

    s_layers, t_layers = layer_stack(student), layer_stack(teacher)
    xs, ys = _capture_teacher_layers(teacher, t_layers, batches, idx, mixed_precision)
    # What the model passes each layer besides the hidden states (RoPE tables, masks): the same for every batch of
    # full rows of one length, so the first batch's calls serve all.
    with torch.no_grad():
        calls = _capture_layer_inputs(student, s_layers, max(idx), [{"input_ids": batches[0]}], _device(student))[1][0]
    rows_per_step = batches[0].shape[0]
    n_rows = xs[0].shape[0]
    result = LayerwiseResult(tokens=n_rows, steps_per_layer=steps)  # rows; the caller turns them into tokens
    all_params = list(student.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    was = student.training
    student.eval()  # no dropout: the target is deterministic

    def delta(layer: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        weight = next(layer.parameters())
        return _call_layer(layer, x.to(weight.dtype), calls[i]).float() - x

    bar = progress_bar(desc="layerwise transfer (blocks)", total=len(idx), unit="layer", force=progress)
    try:
        for p in all_params:
            p.requires_grad_(False)
        for j, i in enumerate(idx):
            layer = s_layers[i]
            params = [p for p in layer.parameters() if p.dtype.is_floating_point]
            # the teacher layer's input, and what it added to it
            stat = _fit(layer, params, lambda x, layer=layer, i=i: delta(layer, i, x), xs[j], ys[j] - xs[j], layer=i,
                        steps=steps, lr=lr, seed=seed, batch_rows=rows_per_step, mixed_precision=mixed_precision,
                        on_steps=on_steps, on_steps_every=on_steps_every, what="decoder-layer output", bar=bar)
            result.layers.append(stat)
            xs[j] = ys[j] = None  # free as we go
    finally:
        for p, flag in zip(all_params, saved_flags):
            p.requires_grad_(flag)
        student.train(was)
        bar.close()
    return result


def layerwise_transfer(
    student: nn.Module,
    teacher: nn.Module,
    calibration: torch.Tensor,
    *,
    layers: Any = None,
    trainable: str = "attention",
    steps: int = 200,
    lr: float = 1e-3,
    batch_rows: int = 4,
    seed: int = 0,
    progress: bool = False,
    on_steps: Callable[[int, int, nn.Module], None] | None = None,
    on_steps_every: int = 10,
    mixed_precision: str = "no",
    inputs: str = "teacher",
) -> LayerwiseResult:
    """Train each student attention module to reproduce the teacher module's output on the teacher's inputs.

    Args:
        student: the converted model (changed in place; parameters outside the attention modules are untouched).
        teacher: the unconverted model (frozen, only run forward).
        calibration: input ids ``(n, L)``: training text disjoint from any evaluation text.
        layers: which layers (default all); see :func:`hf_attn_swap.parse_layers`.
        trainable: ``attention`` (every parameter of the module: Q/K/V/O, feature maps), ``kv``, ``feature_map``
            or ``block`` (every parameter of the decoder layer holding the module, trained to match the teacher
            layer's change to the residual stream; ``inputs="teacher"`` only).
        steps: Adam steps per layer (cosine-decayed learning rate).
        lr: peak learning rate.
        batch_rows: rows of ``calibration`` per step.
        seed: order of the minibatches; layer ``i`` draws from its own generator seeded with ``seed + i``, so a
            layer's result does not depend on which other layers are trained with it (or on which process).
        progress: show a progress bar over layers for this call (else :func:`hf_attn_swap.progress.enable`).
        on_steps: called as ``on_steps(layer, steps_done, module)`` before the first step and after every
            ``on_steps_every`` steps and the last (under ``torch.no_grad``, the module in eval mode): to record how
            a layer's error on other text moves as it trains (``bench/layerwise_overfit.py``).
        on_steps_every: steps between two ``on_steps`` calls.
        mixed_precision: ``bf16`` runs the teacher capture and each training step's forward in bfloat16 under
            autocast (parameters and Adam state stay float32); the before/after errors are measured in float32.
        inputs: what each module is trained on: ``teacher`` (the teacher module's inputs: layers independent) or
            ``student`` (the student's own hidden states after its layers before this one were trained, layer by
            layer in order: each layer also learns to undo what the earlier ones still get wrong; one process).

    Returns:
        Per-layer attention-output MSE before and after.

    Raises:
        ValueError: mismatched teacher/student, too little calibration text, nothing to train, more teacher
            activations to keep than the device has free memory (checked before the teacher runs).
    """
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError("calibration must be a non-empty LongTensor of input ids (n, L)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    idx = check_transferable(student, teacher, layers)
    if swap_record(student) is None:
        logger.warning("the student has no attention swap recorded: layerwise transfer starts from the teacher's own weights")
    from ..convert.adapters import get_adapter

    adapter = get_adapter(student)
    start = time.perf_counter()
    # The teacher and student may sit on an accelerator (one per process under ``accelerate launch``).
    batches = [b.to(_device(student)) for b in _batches(calibration, batch_rows)]
    if inputs not in ("teacher", "student"):
        raise ValueError(f"unknown layerwise inputs {inputs!r}; allowed: teacher, student")
    # before the teacher runs: a capture that does not fit would otherwise end in the kernel's OOM killer
    check_capture_fits(sum(b.numel() for b in batches), hidden_width(teacher), len(idx), _device(teacher), inputs)
    if trainable == "block":
        if inputs != "teacher":
            raise ValueError("layerwise trainable='block' trains each decoder layer on the teacher's inputs; "
                             f"inputs={inputs!r} is not supported with it (use inputs='teacher')")
        result = _block_transfer(student, teacher, batches, idx, steps=steps, lr=lr, seed=seed, progress=progress,
                                 on_steps=on_steps, on_steps_every=on_steps_every, mixed_precision=mixed_precision)
        result.tokens = int(result.tokens * calibration.shape[1])
        result.seconds = time.perf_counter() - start
        return result
    sites = attention_sites(student)
    params_per_layer = [module_parameters(sites[i].module, trainable, adapter.k, adapter.v) for i in idx]
    if not any(params_per_layer):
        raise ValueError(f"nothing to train: trainable={trainable!r} selects no parameter in the attention modules")
    xs, ys = capture_teacher(teacher, batches, idx, mixed_precision, keep_inputs=inputs == "teacher")
    stack = _StudentStack(student, sites, batches, max(idx)) if inputs == "student" else None
    kwargs = module_kwargs(student, batches[0])
    n_rows = ys[0].shape[0]
    result = LayerwiseResult(tokens=int(n_rows * calibration.shape[1]), steps_per_layer=steps)
    all_params = [p for p in student.parameters()]
    saved_flags = [p.requires_grad for p in all_params]
    was = student.training
    student.eval()  # no dropout: the target is deterministic
    bar = progress_bar(desc="layerwise transfer", total=len(idx), unit="layer", force=progress)
    try:
        for p in all_params:
            p.requires_grad_(False)
        for j, (i, params) in enumerate(zip(idx, params_per_layer)):
            module = sites[i].module
            x_all = xs[j] if stack is None else stack.inputs_of(i)
            stat = _fit(module, params, lambda x, module=module: _module_out(module, x, kwargs), x_all, ys[j], layer=i,
                        steps=steps, lr=lr, seed=seed, batch_rows=batch_rows, mixed_precision=mixed_precision,
                        on_steps=on_steps, on_steps_every=on_steps_every, what="attention-output", bar=bar)
            result.layers.append(stat)
            ys[j] = None  # free as we go
            if xs is not None:
                xs[j] = None
    finally:
        for p, flag in zip(all_params, saved_flags):
            p.requires_grad_(flag)
        student.train(was)
        bar.close()
    result.seconds = time.perf_counter() - start
    return result
