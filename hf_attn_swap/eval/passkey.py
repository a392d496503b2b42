"""Passkey retrieval: a 5-digit number hidden at several depths in filler text of several lengths.

Perplexity averages over mostly local predictions and hides what a sliding window or a linear attention forgets;
retrieving one number from far back does not. The probe (after Mohtashami & Jaggi 2023, "Landmark Attention"):

    <instruction> <filler ...> The pass key is 71432. Remember it. 71432 is the pass key. <filler ...> <question>

Every prompt of one length has exactly that many tokens (pieces are tokenized separately and the filler is cut at
token level), so the prompts of one length batch without padding. The model decodes greedily through its cache;
a cell scores 1 when the first number in the answer is the pass key, digit for digit.

Formats: ``"chat"`` wraps the prompt in the tokenizer's chat template (the instruction-tuned default models answer
there); ``"plain"`` ends the prompt with "The pass key is" for the model to complete. SmolLM2-135M-Instruct (the
default model) retrieves every key at 256-1024 tokens and depths 0/0.5/1 in ``plain`` format (18/18 measured). In
``chat`` format it first writes "The pass key is", so the key needs ``max_new_tokens >= 12``; ``plain`` needs 7 and
costs less, hence the default.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..hf_compat import cache_kwarg, output_cache
from ..progress import progress as progress_bar
from .config import PASSKEY_FORMATS

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION_PLAIN = "\n\nWhat is the pass key? The pass key is"
QUESTION_CHAT = "\n\nWhat is the pass key? Answer with the number only."
FORMATS = PASSKEY_FORMATS  # ("plain", "chat"), declared with the torch-free eval config


@dataclass
class PasskeyResult:
    """Accuracy per (length, depth) cell and overall.

    Attributes:
        accuracy: mean over every trial of every cell.
        cells: one dict per cell: ``length``, ``depth``, ``accuracy``, ``trials``, ``answers`` (decoded text).
        format: prompt format used.
    """

    accuracy: float
    cells: list[dict[str, Any]] = field(default_factory=list)
    format: str = "plain"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def grid(self) -> dict[str, float]:
        """``{"<length>@<depth>": accuracy}``, compact for reports."""
        return {f"{c['length']}@{c['depth']:g}": c["accuracy"] for c in self.cells}


def _enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer: Any, length: int, depth: float, key: str, *, format: str = "plain") -> list[int]:
    """Token ids of one passkey prompt of exactly ``length`` tokens.

    Args:
        tokenizer: the model's tokenizer.
        length: total prompt length in tokens (chat markup included).
        depth: where the needle sits in the filler, 0 (start) .. 1 (end, just before the question).
        key: the pass key (digits).
        format: ``"plain"`` or ``"chat"``.

    Raises:
        ValueError: unknown format, depth outside [0, 1], or a length too short for instruction + needle + question.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown passkey format {format!r}; allowed: {', '.join(FORMATS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("format 'chat' needs a tokenizer with a chat template; use format='plain'")
        marker = "\x00HAYSTACK\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": INSTRUCTION + marker + QUESTION_CHAT}], tokenize=False, add_generation_prompt=True
        )
        head_text, tail_text = text.split(marker)
        head, tail = _enc(tokenizer, head_text), _enc(tokenizer, tail_text)
    else:
        head, tail = _enc(tokenizer, INSTRUCTION), _enc(tokenizer, QUESTION_PLAIN)
    needle = _enc(tokenizer, NEEDLE.format(key=key))
    sentence = _enc(tokenizer, FILLER)
    n_fill = length - len(head) - len(tail) - len(needle)
    if n_fill < 0:
        raise ValueError(
            f"passkey length {length} is too short: instruction, needle and question alone take "
            f"{length - n_fill} tokens"
        )
    stream = sentence * (n_fill // max(len(sentence), 1) + 2)
    # Needle at a sentence boundary nearest to depth * n_fill (so filler sentences stay whole before it).
    cut = round(depth * n_fill / len(sentence)) * len(sentence) if sentence else 0
    cut = min(cut, n_fill)
    if depth >= 1.0:
        cut = n_fill
    before = stream[:cut]
    after = stream[cut:n_fill]
    ids = head + before + needle + after + tail
    assert len(ids) == length, (len(ids), length)
    return ids


def make_keys(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic 5-digit pass keys (first digit 1-9)."""
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(n)]


@torch.no_grad()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding through the model's own cache (``generate()``-style); returns the new tokens ``(b, n)``."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    cache, name = output_cache(out), cache_kwarg(model)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    new = [nxt]
    for _ in range(max_new_tokens - 1):
        nxt = model(input_ids=nxt, **{name: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
    return torch.cat(new, dim=1)


def score_answer(answer: str, key: str) -> bool:
    """True when the first number in ``answer`` is exactly ``key``."""
    m = re.search(r"\d+", answer)
    return bool(m) and m.group(0) == key


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module,
    tokenizer: Any,
    *,
    lengths: Sequence[int] = (256, 512, 1024),
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    trials: int = 1,
    format: str = "plain",
    max_new_tokens: int = 7,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> PasskeyResult:
    """Passkey retrieval accuracy per (length, depth) cell.

    Args:
        model: a causal LM (any attention variant).
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens (each at most the model's maximum context).
        depths: needle depths in [0, 1].
        trials: pass keys per cell (different keys, same positions).
        format: ``"plain"`` (completion) or ``"chat"`` (chat template), see the module docstring.
        max_new_tokens: tokens decoded per answer (a 5-digit key plus a leading space fits in 7 for SmolLM2).
        batch_size: prompts per forward (all prompts of one length have the same length).
        seed: seed of the pass keys.
        progress: show a progress bar over the probes for this call (else :func:`hf_attn_swap.progress.enable`).

    Returns:
        A :class:`PasskeyResult`.

    Raises:
        ValueError: empty lengths/depths, trials < 1, a length beyond the model's context, or see :func:`build_prompt`.
    """
    from .perplexity import max_context

    if not lengths or not depths:
        raise ValueError("passkey needs at least one length and one depth")
    if trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials}")
    limit = max_context(model)
    for n in lengths:
        if limit is not None and n + max_new_tokens > limit:
            raise ValueError(f"passkey length {n} (+{max_new_tokens} answer tokens) exceeds the model's context {limit}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    keys = make_keys(trials, seed)
    cells = []
    bar = progress_bar(desc="passkey", total=len(lengths) * len(depths) * len(keys), unit="probe", force=progress)
    try:
        for n in lengths:
            jobs = [(d, k) for d in depths for k in keys]
            prompts = [build_prompt(tokenizer, int(n), float(d), k, format=format) for d, k in jobs]
            answers: list[str] = []
            for i in range(0, len(prompts), batch_size):
                x = torch.tensor(prompts[i : i + batch_size], dtype=torch.long, device=device)
                new = greedy_decode(model, x, max_new_tokens)
                answers += tokenizer.batch_decode(new, skip_special_tokens=True)
                bar.update(len(new))
            for d in depths:
                got = [(a, k) for (dd, k), a in zip(jobs, answers) if dd == d]
                hits = [score_answer(a, k) for a, k in got]
                cells.append({
                    "length": int(n),
                    "depth": float(d),
                    "accuracy": sum(hits) / len(hits),
                    "trials": len(hits),
                    "answers": [a.strip() for a, _ in got],
                })
    finally:
        bar.close()
        model.train(was_training)
    total = sum(c["accuracy"] * c["trials"] for c in cells) / sum(c["trials"] for c in cells)
    return PasskeyResult(accuracy=total, cells=cells, format=format)


__all__ = ["FORMATS", "PasskeyResult", "build_prompt", "greedy_decode", "make_keys", "passkey_accuracy", "score_answer"]
