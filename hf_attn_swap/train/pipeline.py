"""``uptrain``: convert a model, win back what the conversion lost, measure before/after, save.

Stages (:mod:`.stages`, where the rules for several processes live): (0) load the original model, keep a frozen copy as
teacher, convert the student; (1) per-layer attention-output matching on the teacher's hidden states
(:mod:`.layerwise`); (2) end-to-end training with the HF ``Trainer`` (:mod:`.trainer`). Held-out perplexity is measured on the original, the converted, and every stage's result, always on
the same windows of text disjoint from the training text. Everything is validated before anything is written.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import UptrainConfig

logger = logging.getLogger(__name__)

from .stages import FINAL_DIR, RESULT_FILE, STAGE1_DIR  # noqa: F401  (re-exported: where they always were)


@dataclass
class CurvePoint:
    """Held-out perplexity after a stage, with the tokens and seconds spent so far (conversion included)."""

    stage: str
    ppl: float
    tokens: int
    seconds: float
    cpu_seconds: float = 0.0
    #: CPU time spent training (conversion included), without the evaluations: the recipe's cost.
    train_cpu_seconds: float = 0.0
    #: held-out perplexity per evaluated domain.
    domains: dict[str, float] = field(default_factory=dict)
    #: passkey retrieval accuracy (None: not probed).
    passkey: float | None = None


@dataclass
class UptrainResult:
    """What :func:`uptrain` measured. ``recovery`` = share of the log-perplexity gap won back."""

    ppl_original: float | None = None
    ppl_converted: float | None = None
    ppl_uptrained: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    #: CPU time of this process (all threads): what the run costs on an otherwise idle machine, whatever else ran.
    cpu_seconds: float = 0.0
    recovery: float | None = None
    #: the headline domain (eval_corpus, else the first held-out corpus, else the training corpus).
    eval_domain: str | None = None
    #: CPU time without the evaluations (what the recipe costs to train).
    train_cpu_seconds: float = 0.0
    curve: list[CurvePoint] = field(default_factory=list)
    #: per evaluated domain: ``original``, ``converted``, each stage's perplexity, ``recovery``, ``held_out``.
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: passkey accuracy of the original and after each stage ({} when not probed), and the original's cells.
    passkey: dict[str, Any] = field(default_factory=dict)
    #: training tokens per stage and source ({stage: {source: tokens}}).
    mix_tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    layerwise: dict[str, Any] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    eval_tokens: int = 0
    output_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    #: how many processes ran it (``accelerate launch --num_processes``); the per-layer stats say which trained what.
    processes: int = 1
    #: code revision, versions, machine, exact weights and text (:func:`hf_attn_swap.provenance.provenance`).
    provenance: dict[str, Any] = field(default_factory=dict)
    #: the uptrained model itself (not serialised).
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.__dataclass_fields__ if k != "model"}


def _plain(v: Any) -> Any:
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if hasattr(v, "__dataclass_fields__"):
        return asdict(v)
    return v


def log_gap_recovery(original: float, converted: float, uptrained: float) -> float:
    """``(ln converted - ln uptrained) / (ln converted - ln original)``: 1 = all of the loss won back."""
    gap = math.log(converted) - math.log(original)
    return float("nan") if gap == 0 else (math.log(converted) - math.log(uptrained)) / gap


def _ppl(model: nn.Module, ids: torch.Tensor | None, cfg: UptrainConfig) -> float | None:
    if ids is None:
        return None
    from ..eval.perplexity import perplexity

    return perplexity(model, ids, context=cfg.eval_context, batch_size=4, progress=cfg.progress).token_ppl


@dataclass
class PreparedData:
    """The token blocks of every stage and the evaluation ids, all decided before any training."""

    calib: torch.Tensor
    layerwise: torch.Tensor
    end_to_end: torch.Tensor
    #: the headline held-out ids (None: no evaluation).
    held: torch.Tensor | None
    #: the headline's name (a corpus or path).
    held_name: str | None = None
    #: validation ids of every evaluated domain.
    domains: dict[str, torch.Tensor] = field(default_factory=dict)
    #: tokens each source gave each stage.
    mix_tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    sampling_seconds: float = 0.0


def headline_domain(cfg: UptrainConfig) -> str:
    """The corpus whose validation split gives the headline figures: ``eval_corpus``, else the first held-out domain,
    else the single training corpus (or the mix's first corpus)."""
    from .mix import GENERATED, mix_of

    if cfg.eval_corpus:
        return cfg.eval_corpus
    if cfg.held_out:
        return cfg.held_out[0]
    return next(k for k in mix_of(cfg) if k not in GENERATED)


def prepare_data(cfg: UptrainConfig, tokenizer: Any, teacher: nn.Module | None = None) -> PreparedData:
    """Token blocks for conversion calibration, the per-layer stage and the end-to-end stage (disjoint slices of every
    source of the training mix, in its proportions), and the held-out ids (validation splits).

    Raises:
        ValueError: a corpus too small for its share, less than one block for a stage, too little held-out text.
    """
    from .mix import build_stage_data, domain_ids, eval_domains_of, mix_of

    need_e2e = cfg.budget_tokens() if cfg.end_to_end else 0
    L = cfg.block_size
    needs = {"conversion": cfg.conversion_tokens, "layerwise": cfg.layerwise_tokens, "end_to_end": need_e2e}
    for what, n in needs.items():
        if 0 < n < L:
            raise ValueError(f"the {what} stage asks {n} tokens, fewer than one block of {L}; raise it or lower "
                             "block_size")
    data = build_stage_data(tokenizer, teacher, mix_of(cfg), needs, L, seed=cfg.seed, progress=cfg.progress)
    prepared = PreparedData(data.blocks["conversion"], data.blocks["layerwise"], data.blocks["end_to_end"], None,
                            mix_tokens=data.tokens, sampling_seconds=data.sampling_seconds)
    if cfg.eval_windows:
        n = cfg.eval_windows * cfg.eval_context
        name = headline_domain(cfg)
        domains = eval_domains_of(cfg)
        prepared.domains = domain_ids(tokenizer, list(dict.fromkeys([name, *domains])), n)
        prepared.held, prepared.held_name = prepared.domains[name], name
        if name not in domains:
            del prepared.domains[name]
    return prepared


def uptrain(cfg: UptrainConfig, *, resume: bool | str = False, overwrite: bool = False) -> UptrainResult:
    """Run the whole recipe described by ``cfg`` and save the uptrained model to ``cfg.output_dir/final``.

    Under ``accelerate launch --num_processes N`` the conversion runs once, the per-layer stage is split across the
    processes by layer, the end-to-end stage is data-parallel, and only the main process writes (see
    :mod:`.stages`); every process returns the same figures and model.

    Args:
        cfg: the options (see :class:`UptrainConfig`).
        resume: continue an interrupted run in ``cfg.output_dir``: True = its latest checkpoint, or a checkpoint
            path. The per-layer stage's result is reloaded from ``output_dir/stage1`` instead of recomputed.
        overwrite: start over in an ``output_dir`` that holds a previous run, or write beside other files there
            (they are left alone). Without it (or ``resume``, or ``cfg.overwrite``) such a folder is refused, on every
            process, before anything is loaded.

    Returns:
        The measurements; also written to ``output_dir/uptrain_result.json``.

    Raises:
        ValueError: bad options, too little text, nothing to train, a teacher the student cannot be compared with,
            an ``output_dir`` it may not write (:class:`~hf_attn_swap.outputs.OutputDirError`). Nothing is written to
            ``output_dir`` in those cases.
    """
    from ..checkpoint import save_swapped
    from ..registry import get_variant
    from ..zoo import load_model
    from .stages import (FINAL_DIR, RESULT_FILE, ConvertStage, EndToEndStage, Evaluate, LayerwiseStage, RunContext,
                         RunState)
    from .trainer import select_trainable

    from ..devices import resolve

    device, dtype = resolve(cfg.device, cfg.dtype)  # before anything is written or loaded
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.swap_spec()
    if cfg.plan is None:
        get_variant(cfg.variant)  # unknown variant: fail before loading anything
    from .mix import check_sources, describe, eval_domains_of, mix_of

    check_sources(mix_of(cfg), cfg.held_out, eval_domains_of(cfg))  # unknown or held-out-and-trained: before loading
    if cfg.end_to_end and cfg.budget_tokens() < cfg.block_size * cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"the end-to-end budget ({cfg.budget_tokens()} tokens) is less than one step "
                         f"(block_size * batch_size * grad_accum = {cfg.block_size * cfg.batch_size * cfg.grad_accum})")
    ctx = RunContext.from_accelerate(cfg.output_dir, resume)
    ctx.check_output_dir(overwrite or cfg.overwrite)  # before any work, the main process's verdict on every process
    if not ctx.is_main:
        from .. import progress

        progress.enable(False)  # one set of bars, from the main process
    out = ctx.output_dir
    t0, c0 = time.perf_counter(), time.process_time()
    from ..provenance import git_state

    # the code that runs is the checkout as it is now: by the end a long run may have written results into it
    code_state = git_state() if ctx.is_main else None

    teacher, tokenizer = load_model(cfg.model, dtype=dtype)
    teacher = teacher.to(device)
    student = copy.deepcopy(teacher)
    if cfg.layerwise_tokens:
        # Before the text is prepared (teacher samples take minutes): the per-layer stage keeps its layers' teacher
        # activations; checked again, exactly, when it starts.
        from ..api import attention_sites
        from .layerwise import check_capture_fits, hidden_width

        layers = list(range(len(attention_sites(teacher))))
        n_layers = len(ctx.owned_layers(layers))
        if device.type == "cpu":
            # processes launched on one machine share its RAM: together they keep what their layers need
            local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
            n_layers = min(len(layers), n_layers * local)
        check_capture_fits(cfg.layerwise_tokens, hidden_width(teacher), n_layers, device, cfg.layerwise_inputs)
    data = prepare_data(cfg, tokenizer, teacher)
    calib, lw_ids, e2e_ids, held = data.calib, data.layerwise, data.end_to_end, data.held
    calib, lw_ids = calib.to(device), lw_ids.to(device)  # end-to-end batches: the Trainer moves each one
    logger.info("uptrain: student and teacher on %s in %s; training text: %s", device, cfg.dtype,
                describe(mix_of(cfg)))
    result = UptrainResult(config=cfg.to_dict(), output_dir=str(out), eval_tokens=0 if held is None else held.numel(),
                           processes=ctx.world_size, eval_domain=data.held_name, mix_tokens=data.mix_tokens)
    # Validate what the end-to-end stage will train before spending time on conversion.
    if cfg.end_to_end:
        probe = copy.deepcopy(student) if cfg.trainable == "lora" else student
        select_trainable(probe, cfg.trainable, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
        del probe
        for p in student.parameters():
            p.requires_grad_(True)
    run = RunState(cfg, teacher, student, tokenizer, calib, lw_ids, e2e_ids, held, result, t0=t0, c0=c0,
                   domains=data.domains)

    result.ppl_original = Evaluate("original")(ctx, run, teacher)
    layerwise, end_to_end = LayerwiseStage(cfg), EndToEndStage(cfg)
    if resume and layerwise.saved(ctx):
        layerwise.restore(ctx, run)  # stands for the conversion too
    else:
        ConvertStage(cfg).run(ctx, run)
        result.ppl_converted = Evaluate("converted")(ctx, run)
        if not layerwise.skip() and lw_ids.numel():
            layerwise.run(ctx, run)
            Evaluate("layerwise")(ctx, run)
            if not end_to_end.skip():
                layerwise.save(ctx, run)
    if result.ppl_converted is None and resume:
        prev = out / RESULT_FILE
        found = json.loads(prev.read_text()).get("ppl_converted") if ctx.is_main and prev.is_file() else None
        result.ppl_converted = ctx.share(found)

    if not end_to_end.skip() and e2e_ids.shape[0]:
        end_to_end.run(ctx, run)
        Evaluate("end_to_end")(ctx, run)
    student = run.student
    result.ppl_uptrained = result.curve[-1].ppl if result.curve and held is not None else None
    result.tokens = run.tokens
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - c0
    result.train_cpu_seconds = result.cpu_seconds - run.eval_cpu
    if result.ppl_original and result.ppl_converted and result.ppl_uptrained:
        result.recovery = log_gap_recovery(result.ppl_original, result.ppl_converted, result.ppl_uptrained)
    result.domains = domain_table(result, cfg, run.original_domains)
    if ctx.is_main:  # the only writer; the others wait so that every process returns after the files exist
        from ..provenance import provenance

        from .mix import GENERATED

        corpora = [k for k in mix_of(cfg) if k not in GENERATED] + list(run.domains) + [data.held_name or cfg.corpus]
        result.provenance = provenance(models=[teacher], corpora=list(dict.fromkeys(corpora)))
        result.provenance["git"] = code_state
        save_swapped(student, out / FINAL_DIR, tokenizer, overwrite=True)  # this run's own, checked above
        (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    ctx.wait()
    result.model = student
    logger.info("uptrain: ppl original %s, converted %s, uptrained %s (recovery %s) with %d tokens in %.0f s",
                result.ppl_original, result.ppl_converted, result.ppl_uptrained, result.recovery, run.tokens,
                result.seconds)
    return result


def domain_table(result: UptrainResult, cfg: UptrainConfig, original: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per evaluated domain: the original's and each stage's perplexity and the share of the log gap won back."""
    table: dict[str, dict[str, Any]] = {}
    for name, ppl in original.items():
        row: dict[str, Any] = {"original": ppl, "held_out": name in cfg.held_out}
        for point in result.curve:
            if name in point.domains:
                row[point.stage] = point.domains[name]
        if "converted" in row and len(result.curve) > 1:
            last = result.curve[-1].stage
            row["recovery"] = log_gap_recovery(ppl, row["converted"], row[last]) if last in row else None
        table[name] = row
    return table


def train_end_to_end(student: nn.Module, teacher: nn.Module | None, blocks: torch.Tensor, cfg: UptrainConfig, *,
                     resume: bool | str = False) -> tuple[nn.Module, list[dict[str, Any]], int]:
    """The end-to-end stage: ``UptrainTrainer`` over ``blocks``.

    Returns:
        (the trained model with LoRA merged, the Trainer's log history, training tokens seen).

    Raises:
        ValueError: empty data, nothing to train, teacher mismatch.
    """
    from transformers import TrainingArguments

    from .trainer import BlockDataset, LossLog, StopAfterSeconds, UptrainTrainer, collate, select_trainable

    data = BlockDataset(blocks)
    model = select_trainable(student, cfg.trainable, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
    from .stages import use_cpu

    # The Trainer keeps the model where uptrain put it: CPU when there is no GPU, accelerate says --cpu, or device=cpu.
    cpu = use_cpu() or next(student.parameters()).device.type == "cpu"
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=float(cfg.warmup_ratio),  # a float < 1 is a share of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="cosine",
        num_train_epochs=1,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[],
        use_cpu=cpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
        include_num_input_tokens_seen=True,
    )
    callbacks = [LossLog()]
    if cfg.max_seconds:
        callbacks.append(StopAfterSeconds(cfg.max_seconds))
    trainer = UptrainTrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks,
        teacher=teacher if (cfg.kl_weight or cfg.attn_weight) else None,
        lm_weight=cfg.lm_weight, kl_weight=cfg.kl_weight, attn_weight=cfg.attn_weight, temperature=cfg.temperature,
        mixed_precision=cfg.mixed_precision,
    )
    ckpt = resume if isinstance(resume, str) else (True if resume and _has_checkpoint(cfg.output_dir) else None)
    # Under FSDP (accelerate launch --config_file recipes/configs/fsdp_*.yaml) training shards the parameters in
    # place; an unsharded copy taken now receives the gathered full weights afterwards.
    template = copy.deepcopy(model) if getattr(trainer, "is_fsdp_enabled", False) else None
    trainer.train(resume_from_checkpoint=ckpt)
    log = [dict(e) for e in trainer.state.log_history]
    seen = int(trainer.state.num_input_tokens_seen or trainer.state.global_step * cfg.batch_size * cfg.grad_accum
               * blocks.shape[1])
    model = trainer.model if template is None else _unshard(trainer, template)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # LoRA folded into the weights: saves as a plain model
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, log, seen


def _unshard(trainer: Any, template: nn.Module) -> nn.Module:
    """The FSDP-trained weights, gathered in full (a collective: every process calls it) into ``template``."""
    from .stages import RunContext

    ctx = RunContext.from_accelerate(trainer.args.output_dir)
    full = trainer.accelerator.get_state_dict(trainer.model)  # full on the main process, CPU; empty elsewhere
    template.load_state_dict(ctx.share(full if ctx.is_main else None), strict=True)
    return template


def _has_checkpoint(output_dir: str) -> bool:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(output_dir).is_dir() and get_last_checkpoint(output_dir) is not None
