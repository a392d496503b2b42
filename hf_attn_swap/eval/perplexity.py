"""Strided sliding-window perplexity of any causal LM, with explicit normalisations.

Windows of ``context`` tokens advance by ``stride`` tokens. Each window scores only the tokens that no earlier window
scored (the others are context only), so every token after the first is scored exactly once; the first token of the
input has nothing to be predicted from and is never scored. ``stride == context`` (the default) gives windows that
share a single token (the first token of a window is predicted from the end of the previous one, instead of being
dropped as in the common ``-100``-label recipe); a smaller stride gives every scored token at least
``context - stride`` tokens of context, at ``context / stride`` times the cost. See :func:`windows`.

Normalisations (tools disagree, see lm-evaluation-harness #2301 and #1471, so every result states its own):

* ``token_ppl = exp(nll_sum / n_tokens)``, ``n_tokens`` = tokens scored (``len(input_ids) - 1``), in the model's own
  tokenization: not comparable across tokenizers.
* ``bits_per_byte = nll_sum / (ln 2 * n_bytes)``, ``n_bytes`` = UTF-8 bytes of the evaluated text: tokenizer-free.
* ``word_ppl = exp(nll_sum / n_words)``, ``n_words`` = whitespace-separated words of the evaluated text
  (lm-evaluation-harness's ``word_perplexity``): tokenizer-free.

The bytes and words include those of the first (unscored) token; on thousands of tokens the difference is below
0.1%, and it is the convention of lm-evaluation-harness's rolling loglikelihood minus its BOS prefix.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress as progress_bar

logger = logging.getLogger(__name__)

NORMALISATION = (
    "token_ppl = exp(nll_sum / n_tokens) over the n_tokens scored tokens (all but the first); "
    "bits_per_byte = nll_sum / (ln 2 * n_bytes), n_bytes = UTF-8 bytes of the evaluated text; "
    "word_ppl = exp(nll_sum / n_words), n_words = whitespace-separated words of the evaluated text"
)


@dataclass
class PerplexityResult:
    """One perplexity evaluation.

    Attributes:
        token_ppl: ``exp(nll_sum / n_tokens)``.
        nll_sum: summed negative log-likelihood in nats over the scored tokens.
        n_tokens: number of tokens scored (every token but the first).
        bits_per_byte: ``nll_sum / (ln 2 * n_bytes)``; None without ``text``.
        word_ppl: ``exp(nll_sum / n_words)``; None without ``text``.
        context: window length in tokens.
        stride: scored tokens per window after the first (``min(requested stride, context - 1)``).
        n_windows: number of model calls' worth of windows.
        n_bytes: UTF-8 bytes of the evaluated text (None without text).
        n_words: whitespace words of the evaluated text (None without text).
        normalisation: the formulas above, in words.
    """

    token_ppl: float
    nll_sum: float
    n_tokens: int
    bits_per_byte: float | None
    word_ppl: float | None
    context: int
    stride: int
    n_windows: int = 0
    n_bytes: int | None = None
    n_words: int | None = None
    normalisation: str = NORMALISATION

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return self.nll_sum / self.n_tokens

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The evaluation windows over ``n`` tokens.

    The first window ``[0, min(context, n))`` scores tokens ``1..end-1``. Each later window scores the next
    ``min(stride, context - 1)`` tokens and ends on the last of them, with as much preceding context as fits in
    ``context`` tokens (so every window but a short single one is exactly ``context`` long, which batches without
    padding). With ``stride == context`` consecutive windows share one token: the first token of a window is then
    predicted from the last token of the previous one instead of not being scored at all.

    Returns:
        ``(begin, end, n_scored)`` per window: the window is ``ids[begin:end]`` and its last ``n_scored`` tokens are
        scored (predicted from everything before them in the window). Together they score ``ids[1:n]`` exactly once.
    """
    if n < 2:
        raise ValueError(f"need at least 2 tokens to compute a perplexity, got {n}")
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and context ({context}), got {stride}")
    step = min(stride, context - 1)
    end = min(context, n)
    out = [(0, end, end - 1)]  # token 0 is never scored: nothing predicts it
    while end < n:
        prev_end, end = end, min(end + step, n)
        out.append((max(0, end - context), end, end - prev_end))
    return out


def max_context(model: nn.Module) -> int | None:
    """The longest context the model's config allows (``max_position_embeddings`` or similar), or None."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    context: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    text: str | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Strided sliding-window perplexity of a causal LM over one long token sequence.

    Works for any model that maps ``input_ids (b, L)`` to ``.logits (b, L, V)`` causally, whatever attention it was
    swapped to. Deterministic (no sampling, no dropout: the model is put in eval mode and restored afterwards).

    Threads: this is CPU-bound matrix work and torch's default thread count (one per core) can be far slower on a
    busy or small machine than one thread, because the threads wait for each other while other processes hold the
    cores (on a shared 2-core box a ``fit`` conversion took 262-421 s with the default against about 33 s with one
    thread). Call ``torch.set_num_threads(1)`` (or set ``OMP_NUM_THREADS=1`` before starting Python) there; the result
    does not change, only the time. This function leaves the thread count as it finds it.

    Args:
        model: a causal LM.
        input_ids: 1-D LongTensor of the whole evaluation text (no special tokens needed).
        context: window length in tokens (at most the model's ``max_position_embeddings``).
        stride: new tokens scored per window, ``1..context``; default ``context`` (windows overlap by one token,
            see :func:`windows`).
        batch_size: windows per forward pass (windows of equal length are batched; the shorter last one alone).
        text: the text ``input_ids`` encode; enables ``bits_per_byte`` and ``word_ppl``.
        progress: show a progress bar for this call (per batch of windows, with time left); without it the bar
            follows :func:`hf_attn_swap.progress.enable` / ``HF_ATTN_SWAP_PROGRESS``.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ValueError: fewer than 2 tokens, ``input_ids`` not 1-D, bad ``context``/``stride``/``batch_size``, or a
            context longer than the model allows.

    Example:
        >>> ids = tokenize(tok, load_text("shakespeare", split="validation"), max_tokens=4096)
        >>> perplexity(model, ids, context=512, stride=256).token_ppl
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 1-D LongTensor of the whole text, got {shape}")
    n = int(input_ids.numel())
    if n < 2:
        raise ValueError(f"empty corpus: need at least 2 tokens to compute a perplexity, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    stride = context if stride is None else stride
    limit = max_context(model)
    if limit is not None and context > limit:
        raise ValueError(
            f"context={context} is longer than the model allows (max_position_embeddings={limit}); "
            f"use context <= {limit}"
        )
    wins = windows(n, context, stride)

    # Group windows of equal length so they batch without padding (all are `context` long unless n < context).
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [ws[i : i + batch_size] for _, ws in sorted(groups.items(), reverse=True) for i in range(0, len(ws), batch_size)]

    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    device = _device(model)
    ids = input_ids.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_scored = 0
    bar = progress_bar(desc=f"perplexity (context {context}, stride {stride})", total=len(wins), unit="window",
                       force=progress)
    try:
        for batch in batches:
            x = torch.stack([ids[b:e] for b, e, _ in batch])
            max_scored = max(s for _, _, s in batch)
            kwargs: dict[str, Any] = {"use_cache": False}
            if keep_kw:  # only the positions that predict scored tokens: saves the (L, vocab) logits of the rest
                kwargs["logits_to_keep"] = max_scored + 1
            logits = model(input_ids=x, **kwargs).logits
            L = x.shape[1]
            kept = logits.shape[1]
            for row, (_, _, s) in enumerate(batch):
                # logits at window positions L-s-1 .. L-2 predict tokens L-s .. L-1
                lg = logits[row, kept - s - 1 : kept - 1].float()
                tgt = x[row, L - s :]
                nll_sum += float(F.cross_entropy(lg, tgt, reduction="sum"))
                n_scored += s
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    assert n_scored == n - 1, (n_scored, n)  # every token after the first, once

    n_bytes = len(text.encode("utf-8")) if text is not None else None
    n_words = len(text.split()) if text is not None else None
    if text is not None and (not n_bytes or not n_words):
        raise ValueError("text is empty: bits per byte and word perplexity need the text the tokens encode")
    return PerplexityResult(
        token_ppl=math.exp(nll_sum / n_scored),
        nll_sum=nll_sum,
        n_tokens=n_scored,
        bits_per_byte=(nll_sum / (math.log(2) * n_bytes)) if n_bytes else None,
        word_ppl=_safe_exp(nll_sum / n_words) if n_words else None,
        context=context,
        stride=min(stride, context - 1),
        n_windows=len(wins),
        n_bytes=n_bytes,
        n_words=n_words,
    )


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def perplexity_of_text(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    max_tokens: int | None = None,
    **kw: Any,
) -> PerplexityResult:
    """Tokenize ``text`` (without special tokens) and run :func:`perplexity` on it.

    With ``max_tokens`` only the first ``max_tokens`` tokens are evaluated, and bytes and words are counted on the
    text those tokens decode to, so the three normalisations describe the same span.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        text: the evaluation text (e.g. ``load_text("shakespeare", split="validation")``).
        max_tokens: evaluate at most this many tokens.
        **kw: passed to :func:`perplexity` (``context``, ``stride``, ``batch_size``, ``progress``).

    Raises:
        ValueError: empty text, or see :func:`perplexity`.
    """
    from ..data import tokenize

    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty corpus: the evaluation text is empty")
    ids = tokenize(tokenizer, text, max_tokens)
    # Without a cut the span is the text itself; with one, what the kept tokens decode to (exact for byte-level BPE).
    span = text if max_tokens is None else tokenizer.decode(ids.tolist())
    return perplexity(model, ids, text=span, **kw)


__all__ = ["NORMALISATION", "PerplexityResult", "max_context", "perplexity", "perplexity_of_text", "windows"]
