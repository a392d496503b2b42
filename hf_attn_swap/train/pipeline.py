"""``uptrain``: convert a model, win back what the conversion lost, measure before/after, save.

Stages: (0) load the original model, keep a frozen copy as teacher, convert the student; (1) per-layer attention-output
matching on the teacher's hidden states (:mod:`.layerwise`); (2) end-to-end training with the HF ``Trainer``
(:mod:`.trainer`). Held-out perplexity is measured on the original, the converted, and every stage's result, always on
the same windows of text disjoint from the training text. Everything is validated before anything is written.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
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
class CurvePoint:
    """Held-out perplexity after a stage, with the tokens and seconds spent so far (conversion included)."""

    stage: str
    ppl: float
    tokens: int
    seconds: float
    cpu_seconds: float = 0.0


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
    curve: list[CurvePoint] = field(default_factory=list)
    layerwise: dict[str, Any] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    eval_tokens: int = 0
    output_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)
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


def prepare_data(cfg: UptrainConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token blocks for conversion calibration, the per-layer stage and the end-to-end stage (disjoint slices of the
    training split, in that order), and the held-out ids (validation split).

    Raises:
        ValueError: a stage asks for more tokens than the training text has, or less than one block.
    """
    from ..data import load_text, tokenize

    need_e2e = cfg.budget_tokens() if cfg.end_to_end else 0
    need = cfg.conversion_tokens + cfg.layerwise_tokens + need_e2e
    train_ids = tokenize(tokenizer, load_text(cfg.corpus, split="train"), max_tokens=max(need, cfg.block_size))
    L = cfg.block_size
    calib_n = cfg.conversion_tokens
    lw_n = cfg.layerwise_tokens
    if train_ids.numel() < need:
        logger.warning("training text has %d tokens, fewer than the %d asked for: the end-to-end stage gets the rest",
                       train_ids.numel(), need)

    def blocks(lo: int, n: int, what: str) -> torch.Tensor:
        seg = train_ids[lo: lo + n]
        rows = seg.numel() // L
        if n > 0 and rows == 0:
            raise ValueError(
                f"the training text is too short for the {what}: {seg.numel()} tokens left, fewer than one block of "
                f"{L}; use more text or fewer tokens"
            )
        return seg[: rows * L].view(rows, L)

    calib = blocks(0, calib_n, "conversion calibration")
    lw = blocks(calib_n, lw_n, "per-layer stage")
    e2e = blocks(calib_n + lw_n, need_e2e, "end-to-end stage") if cfg.end_to_end else train_ids[:0].view(0, L)
    held = None
    if cfg.eval_windows:
        if cfg.eval_corpus is None or cfg.eval_corpus == cfg.corpus:
            text = load_text(cfg.corpus, split="validation")
        else:
            text = load_text(cfg.eval_corpus, split="validation")
        n = cfg.eval_windows * cfg.eval_context
        held = tokenize(tokenizer, text, max_tokens=n)
        if held.numel() < n:
            raise ValueError(f"held-out text has {held.numel()} tokens, fewer than eval_windows*eval_context = {n}")
    return calib, lw, e2e, held


def uptrain(cfg: UptrainConfig, *, resume: bool | str = False, overwrite: bool = False) -> UptrainResult:
    """Run the whole recipe described by ``cfg`` and save the uptrained model to ``cfg.output_dir/final``.

    Args:
        cfg: the options (see :class:`UptrainConfig`).
        resume: continue an interrupted run in ``cfg.output_dir``: True = its latest checkpoint, or a checkpoint
            path. The per-layer stage's result is reloaded from ``output_dir/stage1`` instead of recomputed.
        overwrite: start over in an ``output_dir`` that holds a previous run, or write beside other files there
            (they are left alone). Without it (or ``resume``) such a folder is refused before anything is loaded.

    Returns:
        The measurements; also written to ``output_dir/uptrain_result.json``.

    Raises:
        ValueError: bad options, too little text, nothing to train, a teacher the student cannot be compared with,
            an ``output_dir`` it may not write (:class:`~hf_attn_swap.outputs.OutputDirError`). Nothing is written to
            ``output_dir`` in those cases.
    """
    from ..api import swap_attention
    from ..checkpoint import load_swapped, save_swapped
    from ..outputs import RUN_KIND, check_output_dir
    from ..registry import get_variant
    from ..zoo import load_model
    from .layerwise import layerwise_transfer
    from .trainer import select_trainable

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    variant, options = cfg.swap_spec()
    if cfg.plan is None:
        get_variant(cfg.variant)  # unknown variant: fail before loading anything
    out = check_output_dir(cfg.output_dir, overwrite=overwrite or cfg.overwrite, resume=bool(resume), kind=RUN_KIND)
    t0, c0 = time.perf_counter(), time.process_time()

    def point(stage: str, ppl: float | None, tokens: int) -> CurvePoint:
        return CurvePoint(stage, float("nan") if ppl is None else ppl, tokens, time.perf_counter() - t0,
                          time.process_time() - c0)

    teacher, tokenizer = load_model(cfg.model)
    student = copy.deepcopy(teacher)
    calib, lw_ids, e2e_ids, held = prepare_data(cfg, tokenizer)
    result = UptrainResult(config=cfg.to_dict(), output_dir=str(out), eval_tokens=0 if held is None else held.numel())
    # Validate what the end-to-end stage will train before spending time on conversion.
    if cfg.end_to_end:
        probe = copy.deepcopy(student) if cfg.trainable == "lora" else student
        select_trainable(probe, cfg.trainable, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha)
        del probe
        for p in student.parameters():
            p.requires_grad_(True)

    result.ppl_original = _ppl(teacher, held, cfg)
    stage1 = out / STAGE1_DIR
    tokens = 0
    if resume and (stage1 / "config.json").is_file():
        logger.info("resuming: loading the per-layer stage's result from %s", stage1)
        student = load_swapped(stage1)
        result.layerwise = json.loads((stage1 / "layerwise.json").read_text()) if (stage1 / "layerwise.json").is_file() else None
        tokens = calib.numel() + lw_ids.numel()
    else:
        swap_attention(student, variant, calibration=calib if calib.numel() else None, **options)
        tokens = calib.numel()
        result.ppl_converted = _ppl(student, held, cfg)
        result.curve.append(point("converted", result.ppl_converted, tokens))
        if lw_ids.numel():
            lw = layerwise_transfer(student, teacher, lw_ids, trainable=cfg.layerwise_trainable,
                                    steps=cfg.layerwise_steps, lr=cfg.layerwise_lr, batch_rows=cfg.layerwise_rows,
                                    seed=cfg.seed, progress=cfg.progress)
            tokens += lw.tokens
            result.layerwise = lw.to_dict()
            ppl = _ppl(student, held, cfg)
            result.curve.append(point("layerwise", ppl, tokens))
            if cfg.end_to_end:
                save_swapped(student, stage1, tokenizer, overwrite=True)  # this run's own, checked above
                (stage1 / "layerwise.json").write_text(json.dumps(result.layerwise, indent=2))
    if result.ppl_converted is None and resume:
        prev = out / RESULT_FILE
        if prev.is_file():
            result.ppl_converted = json.loads(prev.read_text()).get("ppl_converted")

    if cfg.end_to_end and e2e_ids.shape[0]:
        student, log, seen = train_end_to_end(student, teacher, e2e_ids, cfg, resume=resume)
        result.train_log = log
        tokens += seen
        ppl = _ppl(student, held, cfg)
        result.curve.append(point("end_to_end", ppl, tokens))
    result.ppl_uptrained = result.curve[-1].ppl if result.curve and held is not None else None
    result.tokens = tokens
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - c0
    if result.ppl_original and result.ppl_converted and result.ppl_uptrained:
        result.recovery = log_gap_recovery(result.ppl_original, result.ppl_converted, result.ppl_uptrained)
    from ..provenance import provenance

    result.provenance = provenance(models=[teacher], corpora=[cfg.corpus, cfg.eval_corpus or cfg.corpus])
    save_swapped(student, out / FINAL_DIR, tokenizer, overwrite=True)
    (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    result.model = student
    logger.info("uptrain: ppl original %s, converted %s, uptrained %s (recovery %s) with %d tokens in %.0f s",
                result.ppl_original, result.ppl_converted, result.ppl_uptrained, result.recovery, tokens, result.seconds)
    return result


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
    use_cpu = not torch.cuda.is_available()
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
        use_cpu=use_cpu,
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
    )
    ckpt = resume if isinstance(resume, str) else (True if resume and _has_checkpoint(cfg.output_dir) else None)
    trainer.train(resume_from_checkpoint=ckpt)
    log = [dict(e) for e in trainer.state.log_history]
    seen = int(trainer.state.num_input_tokens_seen or trainer.state.global_step * cfg.batch_size * cfg.grad_accum
               * blocks.shape[1])
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # LoRA folded into the weights: saves as a plain model
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, log, seen


def _has_checkpoint(output_dir: str) -> bool:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(output_dir).is_dir() and get_last_checkpoint(output_dir) is not None
