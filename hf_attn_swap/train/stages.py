"""The uptraining stages as units that know their process, their resume point and their output.

:func:`hf_attn_swap.train.uptrain` runs ``[ConvertStage, LayerwiseStage, EndToEndStage]`` in order, each followed by
an :class:`Evaluate`. Every rule about several processes (``accelerate launch --num_processes N``) lives here:

- :class:`RunContext` is this process's place in the run (rank, world size, run folder, resume) over accelerate's
  ``PartialState``; with one process every collective is a no-op and the run is exactly the single-process one.
- The conversion runs once, on the main process; the converted weights and the swap record are broadcast and the
  other processes rebuild the same structure shape-only (as loading a checkpoint does) and load them.
- The per-layer stage is split across processes by layer (layer ``i`` goes to rank ``i % N``; layers are independent
  given the teacher's hidden states, and each layer is seeded by ``seed + i``, so the split cannot change the result),
  then every process gathers the other processes' trained layers.
- The end-to-end stage is data-parallel: the HF ``Trainer`` already is under accelerate.
- Held-out evaluation runs on the main process and its figure is broadcast.
- Only the main process writes (``stage1/``, ``final/``, the result JSON; the Trainer saves its checkpoints on the
  main process only); the others wait for it where they read what it wrote.
- The output folder is checked by the main process before any work and its verdict raised on every process; a
  failure on one process inside a stage (the conversion, a process's layers) is sent to the others, so every process
  stops with the same message instead of waiting forever in a collective.

Not covered: FSDP shards only the end-to-end stage (``recipes/configs/fsdp_2gpu.yaml``); the conversion, the
per-layer stage and the distillation teacher need the full model on each process.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import UptrainConfig

logger = logging.getLogger(__name__)

STAGE1_DIR = "stage1"
FINAL_DIR = "final"
RESULT_FILE = "uptrain_result.json"


@dataclass
class RunContext:
    """This process's place in an uptraining run.

    Attributes:
        output_dir: the run folder (shared by every process).
        resume: ``--resume``: False, True (latest checkpoint) or a checkpoint path.
        rank: this process's index (accelerate's ``process_index``); 0 is the main process, the only one that writes.
        world_size: number of processes.
        device: where this process computes (accelerate's device for it).
    """

    output_dir: Path
    resume: bool | str = False
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_accelerate(cls, output_dir: str | Path, resume: bool | str = False) -> RunContext:
        """The context of this process as ``accelerate launch`` (or a plain ``python``) started it."""
        from accelerate import PartialState

        # joins the process group when launched with several processes; on CPU accelerate only forms a (gloo)
        # group when told it is on CPU, and the Trainer later reuses this same shared state.
        state = PartialState(cpu=use_cpu())
        return cls(Path(output_dir), resume, state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on."""
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def share(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as process ``src`` has it, on every process (pickled; the others' ``obj`` is ignored)."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=src)[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def owned_layers(self, layers: list[int]) -> list[int]:
        """The share of ``layers`` this process trains: layer ``i`` belongs to rank ``i % world_size``."""
        return [i for i in layers if i % self.world_size == self.rank]

    def check_output_dir(self, overwrite: bool = False) -> None:
        """Refuse, on every process and before any work, an output folder this run may not write.

        The main process looks (so every process gets the same answer even while a slow file system catches up)
        and broadcasts its verdict.

        Raises:
            hf_attn_swap.outputs.OutputDirError: (a ValueError) the rules of
                :func:`hf_attn_swap.outputs.check_output_dir` for a run: a previous run without ``resume`` or
                ``overwrite``, other files without ``overwrite``, a path it cannot write.
        """
        from ..outputs import RUN_KIND, OutputDirError, check_output_dir

        err = None
        if self.is_main:
            try:
                check_output_dir(self.output_dir, overwrite=overwrite, resume=bool(self.resume), kind=RUN_KIND)
            except OutputDirError as e:
                err = str(e)
        err = self.share(err)
        if err:
            raise OutputDirError(err)


def use_cpu() -> bool:
    """Whether this run computes on CPU: no CUDA device, or ``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``)."""
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


@dataclass
class RunState:
    """What the stages hand each other: the models, the data, the result being filled in, and the clocks."""

    cfg: UptrainConfig
    teacher: nn.Module
    student: nn.Module
    tokenizer: Any
    calib: torch.Tensor
    layerwise_ids: torch.Tensor
    e2e_ids: torch.Tensor
    held: torch.Tensor | None
    result: Any  # UptrainResult (pipeline.py; not imported here to keep the import one-way)
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)
    c0: float = field(default_factory=time.process_time)
    #: validation ids of every domain evaluated one by one (beside the headline ``held``).
    domains: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the original model's perplexity per domain.
    original_domains: dict[str, float] = field(default_factory=dict)
    #: CPU seconds spent in evaluations (left out of the recipe's training cost).
    eval_cpu: float = 0.0


class Evaluate:
    """Held-out perplexity of the student after a stage (the headline domain and every evaluated domain) and, when
    configured, its passkey accuracy; appended to the recovery curve.

    Measured on the main process only (every process holds the same weights) and broadcast. Its CPU time is kept
    apart (``RunState.eval_cpu``) so that the recipe's cost is its training alone.
    """

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, ctx: RunContext, run: RunState, model: nn.Module | None = None) -> float | None:
        """Measure ``model`` (default: the student); adds a curve point unless ``label`` is ``original``."""
        from .pipeline import CurvePoint

        c = time.process_time()
        model = run.student if model is None else model
        figures = self._measure(model, run) if ctx.is_main else None
        ppl, domains, passkey = ctx.share(figures)
        run.eval_cpu += time.process_time() - c
        if passkey is not None:
            run.result.passkey[self.label] = passkey
        if self.label == "original":
            run.original_domains = domains
        else:
            cpu = time.process_time() - run.c0
            run.result.curve.append(CurvePoint(self.label, float("nan") if ppl is None else ppl, run.tokens,
                                               time.perf_counter() - run.t0, cpu, cpu - run.eval_cpu, domains,
                                               passkey))
            logger.info("after %s: held-out perplexity %s; per domain %s; passkey %s", self.label, ppl,
                        {k: round(v, 2) for k, v in domains.items()}, passkey)
        return ppl

    @staticmethod
    def _measure(model: nn.Module, run: RunState) -> tuple[float | None, dict[str, float], float | None]:
        from .pipeline import _ppl

        domains = {name: _ppl(model, ids, run.cfg) for name, ids in run.domains.items()}
        # the headline domain is usually one of the evaluated ones: the same ids, measured once
        same = [name for name, ids in run.domains.items() if ids is run.held]
        ppl = domains[same[0]] if same else _ppl(model, run.held, run.cfg)
        passkey = None
        if run.cfg.passkey_lengths:
            from ..eval.passkey import passkey_accuracy

            passkey = passkey_accuracy(model, run.tokenizer, lengths=run.cfg.passkey_lengths, depths=(0.0, 0.5, 1.0),
                                       trials=run.cfg.passkey_trials, format="plain", seed=run.cfg.seed).accuracy
        return ppl, domains, passkey


class Stage:
    """One uptraining stage: ``skip`` says whether it runs, ``restore`` loads its saved output instead (resume),
    ``run`` does the work on every process. Only the main process writes ``output``."""

    name = "stage"
    #: sub-folder of the run this stage saves (None: it saves nothing to resume from).
    output: str | None = None

    def __init__(self, cfg: UptrainConfig) -> None:
        self.cfg = cfg

    def skip(self) -> bool:
        """Whether the config turns this stage off."""
        return False

    def saved(self, ctx: RunContext) -> bool:
        """Whether this stage's output is in the run folder (decided by the main process, the same everywhere)."""
        if self.output is None:
            return False
        found = (ctx.output_dir / self.output / "config.json").is_file() if ctx.is_main else None
        return bool(ctx.share(found))

    def restore(self, ctx: RunContext, run: RunState) -> None:
        """Load this stage's saved output (resume) on every process."""
        raise NotImplementedError

    def run(self, ctx: RunContext, run: RunState) -> None:
        raise NotImplementedError


class ConvertStage(Stage):
    """Swap the student's attention: once, on the main process; every other process receives the result."""

    name = "converted"

    def run(self, ctx: RunContext, run: RunState) -> None:
        from ..api import swap_attention, swap_record

        variant, options = self.cfg.swap_spec()
        payload = None
        if ctx.is_main:
            try:
                swap_attention(run.student, variant, calibration=run.calib if run.calib.numel() else None, **options)
            except Exception as err:
                ctx.share(("error", f"conversion failed on the main process: {err}"))  # the others stop too
                raise
            if ctx.distributed:
                payload = ("ok", (swap_record(run.student).to_dict(), run.student.state_dict()))
        if ctx.distributed:
            status, data = ctx.share(payload)
            if status == "error":
                raise ValueError(data)
            if not ctx.is_main:
                rebuild_swap(run.student, *data)
        run.tokens += run.calib.numel()


def rebuild_swap(model: nn.Module, record: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Give ``model`` (the unconverted original) the swap another process applied: the structure shape-only from
    ``record`` (as loading a checkpoint does), then that process's weights.

    Raises:
        RuntimeError: the weights do not fit the rebuilt structure (a variant whose shape-only replay differs).
    """
    from ..api import RECORD_ATTR, SwapStep, _apply_plan, _plan, attention_sites, swap_record

    steps = [SwapStep(**s) for s in record["steps"]]
    n = len(attention_sites(model))
    for step in steps:
        plan = _plan(step.variant, step.layers, dict(step.options), n)
        for vcfg, idx in plan:
            vcfg.check_model(model, idx)
        _apply_plan(model, plan, structure_only=True)
    model.load_state_dict(state, strict=True)
    # Keep what the real conversion knew (lossy, calibration tokens), not what the shape-only replay saw.
    rec = swap_record(model)
    rec.steps = steps
    rec.original_attn_implementation = record["original_attn_implementation"]
    setattr(model, RECORD_ATTR, rec)


class LayerwiseStage(Stage):
    """Per-layer attention transfer, split across processes by layer, then gathered onto every process."""

    name = "layerwise"
    output = STAGE1_DIR

    def skip(self) -> bool:
        return self.cfg.layerwise_tokens == 0

    def restore(self, ctx: RunContext, run: RunState) -> None:
        from ..checkpoint import load_swapped

        stage1 = ctx.output_dir / STAGE1_DIR
        logger.info("resuming: loading the per-layer stage's result from %s", stage1)
        where = next(run.teacher.parameters())  # the run's device and dtype (uptrain's device=, dtype=)
        run.student = load_swapped(stage1).to(device=where.device, dtype=where.dtype)
        lw = stage1 / "layerwise.json"
        run.result.layerwise = json.loads(lw.read_text()) if lw.is_file() else None
        run.tokens = run.calib.numel() + run.layerwise_ids.numel()

    def run(self, ctx: RunContext, run: RunState) -> None:
        from ..api import attention_sites
        from .layerwise import LayerwiseResult, check_transferable, layerwise_transfer

        cfg = self.cfg
        if not run.layerwise_ids.numel():
            return
        layers = check_transferable(run.student, run.teacher)
        if cfg.layerwise_inputs == "student" and ctx.distributed:
            raise ValueError("layerwise_inputs='student' trains the layers one after another on the student's own "
                             "hidden states, which one process does; run it without accelerate launch, or use "
                             "layerwise_inputs='teacher'")
        mine = ctx.owned_layers(layers)
        run.student.to(ctx.device)
        run.teacher.to(ctx.device)
        local, error = None, None
        if mine:
            try:
                local = layerwise_transfer(run.student, run.teacher, run.layerwise_ids, layers=mine,
                                           trainable=cfg.layerwise_trainable, steps=cfg.layerwise_steps,
                                           lr=cfg.layerwise_lr, batch_rows=cfg.layerwise_rows, seed=cfg.seed,
                                           progress=cfg.progress and ctx.is_main,
                                           mixed_precision=cfg.mixed_precision, inputs=cfg.layerwise_inputs)
            except Exception as err:
                if not ctx.distributed:
                    raise
                error = f"per-layer stage failed on process {ctx.rank} (layers {mine}): {err}"
            else:
                for s in local.layers:
                    s.rank = ctx.rank
        # What each process trained: layer i's attention module, or its whole decoder layer (trainable "block").
        if cfg.layerwise_trainable == "block":
            from .layerwise import layer_stack

            trained = list(layer_stack(run.student))
        else:
            trained = [s.module for s in attention_sites(run.student)]
        if ctx.distributed:
            # Each process sends the modules it trained; CPU copies pickle the same under gloo and NCCL.
            weights = {i: {k: v.detach().cpu() for k, v in trained[i].state_dict().items()} for i in mine}
            parts = ctx.gather((local, weights, error))
            failed = [e for _, _, e in parts if e]
            if failed:  # every process stops with the same message instead of waiting for the failed one
                raise ValueError(failed[0])
            for rank, (_, theirs, _) in enumerate(parts):
                if rank != ctx.rank:
                    for i, sd in theirs.items():
                        trained[i].load_state_dict(sd, strict=True)
            done = [p for p, _, _ in parts if p is not None]
        else:
            done = [local]
        merged = LayerwiseResult(layers=sorted((s for p in done for s in p.layers), key=lambda s: s.layer),
                                 tokens=done[0].tokens, steps_per_layer=cfg.layerwise_steps,
                                 seconds=max(p.seconds for p in done))
        run.tokens += merged.tokens
        run.result.layerwise = merged.to_dict()

    def save(self, ctx: RunContext, run: RunState) -> None:
        """Write ``stage1/`` (main process only) so that ``--resume`` can skip the conversion and this stage."""
        from ..checkpoint import save_swapped

        if ctx.is_main:
            stage1 = ctx.output_dir / STAGE1_DIR
            save_swapped(run.student, stage1, run.tokenizer, overwrite=True)  # this run's own, checked at the start
            (stage1 / "layerwise.json").write_text(json.dumps(run.result.layerwise, indent=2))
        ctx.wait()


class EndToEndStage(Stage):
    """End-to-end training on the HF ``Trainer``: data-parallel under accelerate; it resumes from its own
    ``checkpoint-*`` folders (written by the main process only)."""

    name = "end_to_end"

    def skip(self) -> bool:
        return not self.cfg.end_to_end

    def run(self, ctx: RunContext, run: RunState) -> None:
        from .pipeline import train_end_to_end

        if not run.e2e_ids.shape[0]:
            return
        run.student, log, seen = train_end_to_end(run.student, run.teacher, run.e2e_ids, self.cfg,
                                                  resume=ctx.resume)
        run.result.train_log = log
        run.tokens += seen
