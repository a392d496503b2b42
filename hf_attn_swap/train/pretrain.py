"""Pre-train a small plain multi-head-attention llama decoder here, so the package has a real MHA causal LM to convert.

No plain-MHA English causal LM ships in a package this machine can install (SmolLM2 is already GQA), so
:func:`pretrain` trains one from scratch on the train splits of the shipped corpora and saves it as a vanilla
transformers checkpoint (model + tokenizer) in the cache, where ``hf_attn_swap.zoo.load_model("mha-llama-30m")`` finds
it. The run is a pure function of its config: same seed (and thread count), same weights (data order, initialisation
and the loop are seeded; the model has no dropout; CPU kernels are deterministic for a fixed thread count).

Why a plain loop and not the HF ``Trainer``: the result must appear in the cache atomically (one rename of a complete
folder), while the ``Trainer`` owns an ``output_dir`` of its own checkpoints; the loop here is short, counts tokens
and CPU seconds exactly, and evaluates the held-out splits at fixed steps, which the ``Trainer`` would do through
callbacks and an eval dataset per corpus. Optimiser and schedule are the standard ones (``torch.optim.AdamW``,
transformers' cosine schedule with warm-up).

Cost model: ``FLOPs = tokens * (6 * N + 6 * n_layers * block_size * hidden)``, Kaplan et al. (2020)'s training
estimate, with ``N`` every parameter that takes part in a matrix product: the non-embedding weights plus the output
head (with tied embeddings the head is the embedding matrix; its lookup costs nothing, its product with every hidden
state does, and with SmolLM2's 49,152-token vocabulary it is the largest single matrix).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import cliconfig
from ..cliconfig import ConfigError, check_fields, opt

logger = logging.getLogger(__name__)

#: file in the checkpoint folder with the run's figures (perplexity curve, tokens, FLOPs, CPU seconds, provenance).
RESULT_FILE = "pretrain_result.json"
#: measured on the 2-core machine of this project, 1 thread, default shape, bf16 mixed precision (results/pretrain_mha.md:
#: 655,360 tokens in 872 CPU-seconds, held-out evaluations included; float32 ran ~265); only for the cost estimate
#: logged before a run starts (the run records its real CPU seconds).
TOKENS_PER_CPU_SECOND = 750.0


@dataclass
class PretrainConfig:
    """Options of :func:`pretrain` (``recipes/pretrain_mha.py``); the defaults are the ``mha-llama-30m`` recipe.

    The model is ``LlamaForCausalLM`` with ``num_key_value_heads == num_attention_heads`` (full multi-head attention).
    Embeddings are tied by default: with SmolLM2's 49,152-token vocabulary an untied head would add 18.9M parameters
    (at hidden 384) that only the output layer uses, more than the whole decoder stack.
    """

    name: str = opt("mha-llama-30m", help="short name: the checkpoint goes to <cache>/models/<name>")
    tokenizer: str = opt("smollm2-135m", help="tokenizer: a zoo short name or a local folder with tokenizer files")
    vocab_size: int | None = opt(None, min=1, help="embedding rows; must equal the tokenizer's size (null = it)")
    hidden_size: int = opt(384, min=1, help="model width")
    intermediate_size: int = opt(768, min=1, help="SwiGLU MLP width")
    num_layers: int = opt(8, min=1, help="decoder layers")
    num_heads: int = opt(8, min=1, help="attention heads, each with its own key/value head (MHA)")
    max_position_embeddings: int = opt(2048, min=1, help="longest context the RoPE config allows (decode timing)")
    rope_theta: float = opt(10000.0, gt=0, help="RoPE base")
    tie_embeddings: bool = opt(True, help="share the input embedding and the output head")
    corpora: list[str] = opt(default_factory=lambda: ["shakespeare", "kjv", "sotu"], help=(
        "training text: corpus names (hf_attn_swap.data) or .txt paths; each gives an equal share of the tokens "
        "from its train split, and its validation split is the held-out text"))
    tokens: int = opt(655_360, min=1, help="training tokens (whole batches: rounded down to batch_size*block_size)")
    block_size: int = opt(256, min=2, help="tokens per training sequence")
    batch_size: int = opt(8, min=1, help="sequences per optimizer step")
    lr: float = opt(2e-3, gt=0, help="peak learning rate (AdamW, cosine decay to min_lr_ratio * lr)")
    min_lr_ratio: float = opt(0.1, min=0, max=1, help="final learning rate as a share of lr")
    warmup_ratio: float = opt(0.05, min=0, help="linear warm-up share of the steps")
    weight_decay: float = opt(0.1, min=0, help="AdamW weight decay (matrices only, not norms)")
    max_grad_norm: float = opt(1.0, gt=0, help="gradient clipping")
    init_std: float = opt(0.02, gt=0, help="standard deviation of the initial weights")
    eval_tokens: int = opt(8192, min=2, help="held-out tokens per corpus (validation split)")
    eval_points: int = opt(6, min=0, help="held-out evaluations spread over the run (plus one before training)")
    seed: int = opt(0, help="seed of initialisation and data order")
    threads: int | None = opt(1, min=1, help="torch CPU threads (null = torch's default)")
    mixed_precision: str = opt("bf16", help=(
        "bf16: matrix products in bfloat16 under torch.autocast, weights and AdamW state float32 (2-3x faster on a "
        "CPU with AMX/AVX512-BF16); no: float32 throughout; held-out evaluation is always float32"))
    overwrite: bool = opt(False, help="replace a checkpoint of the same name already in the cache")
    progress: bool = opt(True, help="progress bar over the training steps")

    def __post_init__(self) -> None:
        from .precision import check_mixed_precision

        check_fields(self)
        check_mixed_precision(self.mixed_precision)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; allowed: "
                              f"a head count dividing it ({', '.join(map(str, _divisors(self.hidden_size)))})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head size hidden_size/num_heads = {self.hidden_size // self.num_heads} is odd; RoPE "
                              "rotates pairs of channels: choose num_heads so that the head size is even")
        if self.warmup_ratio >= 1:
            raise ConfigError(f"warmup_ratio is a share of the steps in [0, 1), got {self.warmup_ratio!r}")
        if self.tokens < self.batch_size * self.block_size:
            raise ConfigError(f"tokens={self.tokens} is less than one batch (batch_size*block_size = "
                              f"{self.batch_size * self.block_size})")
        if self.block_size > self.max_position_embeddings:
            raise ConfigError(f"block_size={self.block_size} is longer than max_position_embeddings="
                              f"{self.max_position_embeddings}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name must be a plain folder name (no '/', not hidden), got {self.name!r}")

    @property
    def steps(self) -> int:
        """Optimizer steps: whole batches of ``batch_size * block_size`` tokens."""
        return self.tokens // (self.batch_size * self.block_size)

    @property
    def train_tokens(self) -> int:
        """Tokens the run trains on (``tokens`` rounded down to whole batches)."""
        return self.steps * self.batch_size * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return cliconfig.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """Build from a dict; an unknown key raises :class:`ConfigError` with the closest valid name."""
        return cliconfig.from_dict(cls, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], overrides: list[str] | None = None) -> PretrainConfig:
        """Read a YAML/JSON file, then apply ``key=value`` overrides."""
        return cliconfig.load(cls, path, overrides or [])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class EvalPoint:
    """Held-out perplexity per corpus after ``step`` optimizer steps."""

    step: int
    tokens: int
    ppl: dict[str, float]
    #: geometric mean over the corpora (each corpus weighs the same, like its share of the training tokens).
    ppl_mean: float
    cpu_seconds: float
    train_loss: float | None = None


@dataclass
class PretrainResult:
    """What :func:`pretrain` measured; also ``pretrain_result.json`` in the checkpoint folder."""

    name: str
    path: str
    parameters: int
    non_embedding_parameters: int
    matmul_parameters: int
    tokens: int
    steps: int
    flops: float
    flops_formula: str
    cpu_seconds: float
    wall_seconds: float
    ppl: dict[str, float]
    ppl_mean: float
    curve: list[EvalPoint] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_dir(name: str) -> Path:
    """Where the checkpoint called ``name`` lives: ``cache_dir()/models/<name>`` (the zoo's folder)."""
    from ..fetch import cache_dir

    return cache_dir() / "models" / name


def is_trained(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a finished run (a folder only ever appears complete: see :func:`pretrain`)."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / RESULT_FILE).is_file()


def model_config(cfg: PretrainConfig, vocab_size: int) -> Any:
    """The ``LlamaConfig`` of ``cfg``: full multi-head attention (as many key/value heads as query heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, attention_dropout=0.0,
    )


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a zoo short name (building that entry if needed) or of a local folder."""
    from transformers import AutoTokenizer

    from ..zoo import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def check_vocab(cfg: PretrainConfig, tokenizer: Any) -> int:
    """The embedding size to build: the tokenizer's, or ``cfg.vocab_size`` when it equals it.

    Raises:
        ConfigError: ``vocab_size`` differs from the tokenizer's size (larger: rows no token ever trains; smaller:
            ids the embedding cannot hold).
    """
    n = len(tokenizer)
    if cfg.vocab_size is None or cfg.vocab_size == n:
        return n
    why = ("larger than the tokenizer's: rows past it are never trained" if cfg.vocab_size > n
           else "smaller than the tokenizer's: its ids up to {} would not fit".format(n - 1))
    raise ConfigError(f"vocab_size={cfg.vocab_size} is {why} ({cfg.tokenizer} has {n} tokens); allowed: {n} or null")


def prepare_data(cfg: PretrainConfig, tokenizer: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Training blocks (shuffled, an equal share from each corpus) and the held-out ids per corpus.

    Returns:
        ``(blocks (steps*batch_size, block_size), held_out {corpus: 1-D ids}, stats)``; ``stats`` records per corpus
        the training tokens available in the share, the blocks used and how many passes over them that is.

    Raises:
        ValueError: a corpus whose train split is shorter than one batch, or whose validation split is shorter than
            two tokens; an unknown corpus name.
    """
    import torch

    from ..data import load_text, tokenize

    n_blocks = cfg.steps * cfg.batch_size
    share = [n_blocks // len(cfg.corpora) + (i < n_blocks % len(cfg.corpora)) for i in range(len(cfg.corpora))]
    parts, held, stats = [], {}, {}
    batch_tokens = cfg.batch_size * cfg.block_size
    for corpus, want in zip(cfg.corpora, share):
        ids = tokenize(tokenizer, load_text(corpus, split="train"), max_tokens=max(want, 1) * cfg.block_size)
        if ids.numel() < batch_tokens:
            raise ValueError(f"corpus {corpus!r} is too small: its train split has {ids.numel()} tokens, fewer than "
                             f"one batch (batch_size*block_size = {batch_tokens}); use more text, a smaller batch or "
                             "block, or drop it from corpora")
        have = ids.numel() // cfg.block_size
        blocks = ids[: have * cfg.block_size].view(have, cfg.block_size)
        if want > have:  # a small corpus is repeated to keep its share; said in the result
            blocks = blocks.repeat(math.ceil(want / have), 1)
        parts.append(blocks[:want])
        stats[corpus] = {"train_blocks": want, "distinct_blocks": min(want, have), "passes": round(want / have, 3)}
        val = tokenize(tokenizer, load_text(corpus, split="validation"), max_tokens=cfg.eval_tokens)
        if val.numel() < 2:
            raise ValueError(f"corpus {corpus!r}: its validation split has {val.numel()} tokens, fewer than 2")
        held[corpus] = val
        stats[corpus]["eval_tokens"] = int(val.numel())
    data = torch.cat(parts)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    return data[order], held, stats


def count_parameters(model: Any) -> dict[str, int]:
    """``parameters`` (unique tensors), ``non_embedding_parameters`` and ``matmul_parameters`` (non-embedding plus
    the output head, see the module's cost model)."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    non_emb = total - emb.numel() - (0 if head is emb else head.numel())
    return {"parameters": total, "non_embedding_parameters": non_emb, "matmul_parameters": non_emb + head.numel()}


def training_flops(cfg: PretrainConfig, matmul_parameters: int, tokens: int) -> float:
    """``tokens * (6 N + 6 n_layers block_size hidden)``: weights' forward+backward plus attention scores."""
    return float(tokens) * (6.0 * matmul_parameters + 6.0 * cfg.num_layers * cfg.block_size * cfg.hidden_size)


def _evaluate(model: Any, held: dict[str, Any], cfg: PretrainConfig) -> dict[str, float]:
    from ..eval.perplexity import perplexity

    return {c: perplexity(model, ids, context=cfg.block_size, batch_size=8).token_ppl for c, ids in held.items()}


def _geo_mean(values: dict[str, float]) -> float:
    return math.exp(sum(math.log(v) for v in values.values()) / len(values))


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train ``cfg``'s model from scratch and save it (model + tokenizer, ``save_pretrained``) atomically.

    Every check runs before the first step: the config (types, heads dividing the width), the checkpoint folder
    (an existing one is refused without ``overwrite``), the vocabulary against the tokenizer, every corpus against
    one batch. The folder appears in one rename once complete; a failure or an interrupt at any point leaves the
    cache as it was (at most a hidden ``.<name>.*`` temporary folder of a killed process, never a folder that
    counts as trained).

    Args:
        cfg: the options; the checkpoint goes to ``cache_dir()/models/<cfg.name>`` (:func:`checkpoint_dir`).

    Returns:
        The measurements (also in ``pretrain_result.json`` beside the weights).

    Raises:
        ConfigError: a bad option, a vocabulary that does not match the tokenizer.
        ValueError: a corpus too small for one batch, a checkpoint already there without ``overwrite``.
    """
    dest = checkpoint_dir(cfg.name)
    if dest.exists() and not cfg.overwrite:
        raise ValueError(f"{dest} already holds a model called {cfg.name!r}; load it with "
                         f"hf_attn_swap.zoo.load_model({str(dest)!r}), or set overwrite=true to train it again")
    from ..eval.speed import num_threads

    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab = check_vocab(cfg, tokenizer)
    blocks, held, stats = prepare_data(cfg, tokenizer)

    def fill(folder: Path) -> PretrainResult:
        model, result = train(cfg, vocab, blocks, held, stats)
        result.path = str(dest)
        save(model, tokenizer, result, folder)
        return result

    with num_threads(cfg.threads):  # the caller's thread count comes back afterwards (the zoo trains on first use)
        return publish(dest, fill)


def train(cfg: PretrainConfig, vocab: int, blocks: Any, held: dict[str, Any], stats: dict[str, Any]
          ) -> tuple[Any, PretrainResult]:
    """The training loop on prepared data: returns the trained model (eval mode) and its figures (path unset)."""
    import torch
    from transformers import LlamaForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

    from ..progress import progress
    from ..provenance import model_weights, provenance
    from .precision import autocast

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg, vocab))
    counts = count_parameters(model)
    tokens = cfg.train_tokens
    flops = training_flops(cfg, counts["matmul_parameters"], tokens)
    logger.info("pre-training %s from scratch: %.1fM parameters (MHA, %d layers x %d heads, hidden %d), %s tokens "
                "from %s, %.2g FLOPs; about %.0f CPU-minutes at %.0f tokens per CPU-second",
                cfg.name, counts["parameters"] / 1e6, cfg.num_layers, cfg.num_heads, cfg.hidden_size,
                f"{tokens:,}", ", ".join(cfg.corpora), flops, tokens / TOKENS_PER_CPU_SECOND / 60,
                TOKENS_PER_CPU_SECOND)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=round(cfg.warmup_ratio * cfg.steps), num_training_steps=cfg.steps,
        min_lr_rate=cfg.min_lr_ratio)
    at = {round(cfg.steps * (i + 1) / cfg.eval_points) for i in range(cfg.eval_points)} | {cfg.steps}
    c0, t0 = time.process_time(), time.perf_counter()
    curve: list[EvalPoint] = []

    def point(step: int, loss: float | None) -> None:
        ppl = _evaluate(model, held, cfg)
        curve.append(EvalPoint(step, step * cfg.batch_size * cfg.block_size, ppl, _geo_mean(ppl),
                               time.process_time() - c0, loss))
        logger.info("step %d/%d: held-out ppl %s", step, cfg.steps,
                    ", ".join(f"{c} {v:.1f}" for c, v in ppl.items()))

    point(0, None)
    model.train()
    losses: list[float] = []
    bar = progress(desc=f"pre-training {cfg.name}", total=cfg.steps, unit="step", force=cfg.progress)
    try:
        for step in range(1, cfg.steps + 1):
            x = blocks[(step - 1) * cfg.batch_size: step * cfg.batch_size]
            with autocast(cfg.mixed_precision, x.device):
                loss = model(input_ids=x, labels=x).loss  # transformers' loss upcasts the logits to float32
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step in at:
                window = losses[-max(1, cfg.steps // max(cfg.eval_points, 1)):]
                point(step, sum(window) / len(window))
                model.train()
    finally:
        bar.close()
    model.eval()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    last = curve[-1]
    result = PretrainResult(
        name=cfg.name, path="", parameters=counts["parameters"],
        non_embedding_parameters=counts["non_embedding_parameters"], matmul_parameters=counts["matmul_parameters"],
        tokens=tokens, steps=cfg.steps, flops=flops,
        flops_formula="tokens * (6 * matmul_parameters + 6 * num_layers * block_size * hidden_size)",
        cpu_seconds=cpu, wall_seconds=wall, ppl=last.ppl, ppl_mean=last.ppl_mean, curve=curve,
        data=stats, config=cfg.to_dict(),
        provenance=provenance(corpora=cfg.corpora) | {"tokenizer": model_weights(cfg.tokenizer)},
    )
    logger.info("pre-trained %s: %s tokens in %.0f CPU-seconds (%.0f wall), held-out ppl %s", cfg.name,
                f"{tokens:,}", cpu, wall, ", ".join(f"{c} {v:.1f}" for c, v in last.ppl.items()))
    return model, result


def save(model: Any, tokenizer: Any, result: PretrainResult, folder: Path) -> None:
    """Write the vanilla checkpoint, the tokenizer, the zoo's source record and the result into ``folder``."""
    from ..provenance import local_weights
    from ..zoo import SOURCE_FILE

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {"name": result.name, "registry": "trained", "source": "trained here by hf_attn_swap.train.pretrain",
              "config": result.config, "tokens": result.tokens, "ppl": result.ppl,
              "git": result.provenance.get("git"), "cache_path": result.path,
              "weights_sha256": local_weights(folder)["weights_sha256"]}
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (folder / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def publish(dest: Path, fill: Callable[[Path], PretrainResult]) -> PretrainResult:
    """Fill a hidden temporary sibling of ``dest``, then rename it to ``dest`` (replacing an old one last).

    A failure inside ``fill`` removes the temporary folder and leaves ``dest`` (present or not) untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)
    old = None
    try:
        result = fill(tmp)
        if dest.exists():  # overwrite=true, checked before training: the old one goes only now
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return result


def report(result: PretrainResult, path: str | os.PathLike[str]) -> list[Path]:
    """Write ``result`` as JSON at ``path``, a Markdown summary (``.md``) and the held-out curve (``.png``) beside it.

    Returns:
        The files written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    path.write_text(json.dumps(data, indent=2) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown(data, path.name))
    png = path.with_suffix(".png")
    plot_curve(data, png)
    return [path, md, png]


def markdown(r: dict[str, Any], json_name: str) -> str:
    """The summary of a ``pretrain_result.json``: every figure read from it."""
    prov = r.get("provenance", {})
    git = prov.get("git") or {}
    corpora = list(r["ppl"])
    lines = [
        f"# Pre-training {r['name']}",
        "",
        f"Generated from `{json_name}` by `{prov.get('command', '?')}` at commit `{git.get('commit')}`"
        f"{' (uncommitted changes)' if git.get('dirty') else ''} on {prov.get('cpu', '?')} "
        f"({prov.get('torch_threads')} torch thread(s), load average {prov.get('load_average')}).",
        "",
        f"- model: llama, {r['config']['num_layers']} layers, {r['config']['num_heads']} query / "
        f"{r['config']['num_heads']} KV heads (MHA), hidden {r['config']['hidden_size']}, "
        f"{r['parameters'] / 1e6:.1f}M parameters ({r['non_embedding_parameters'] / 1e6:.1f}M non-embedding; "
        f"tied embeddings: {r['config']['tie_embeddings']})",
        f"- tokens: {r['tokens']:,} ({r['steps']} steps of {r['config']['batch_size']} x "
        f"{r['config']['block_size']}), an equal share from each of {', '.join(corpora)}",
        f"- FLOPs: {r['flops']:.3g} (`{r['flops_formula']}`)",
        f"- CPU seconds: {r['cpu_seconds']:.0f} (wall {r['wall_seconds']:.0f} s, held-out evaluations included)",
        f"- checkpoint: `{r['path']}`",
        "",
        "Held-out perplexity (validation split of each corpus, " +
        ", ".join(f"{c} {v['eval_tokens']:,} tokens" for c, v in r["data"].items()) +
        f"; windows of {r['config']['block_size']} tokens):",
        "",
        "| step | tokens | " + " | ".join(corpora) + " | geometric mean | train loss | CPU s |",
        "|---:|---:|" + "---:|" * len(corpora) + "---:|---:|---:|",
    ]
    for p in r["curve"]:
        loss = "" if p["train_loss"] is None else f"{p['train_loss']:.3f}"
        lines.append(f"| {p['step']} | {p['tokens']:,} | " + " | ".join(f"{p['ppl'][c]:,.1f}" for c in corpora) +
                     f" | {p['ppl_mean']:,.1f} | {loss} | {p['cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curve(r: dict[str, Any], path: Path) -> None:
    """Held-out perplexity per corpus against training tokens (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["tokens"] for p in r["curve"]]
    for c in r["ppl"]:
        ax.plot(xs, [p["ppl"][c] for p in r["curve"]], marker="o", label=c)
    ax.plot(xs, [p["ppl_mean"] for p in r["curve"]], "k--", label="geometric mean")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{r['name']}: {r['parameters'] / 1e6:.1f}M MHA llama, {r['cpu_seconds'] / 60:.0f} CPU-min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
