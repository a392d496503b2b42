"""Encoder fidelity: how close a converted encoder's sentence embeddings stay to the original's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: list[str], *, batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled (over real tokens) last hidden states, L2-normalised: sentence-transformers' MiniLM recipe."""
    if not sentences:
        raise ValueError("no sentences to embed")
    out = []
    model.eval()
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of two (normalised) embedding matrices."""
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    return float((reference * candidate).sum(-1).mean())


def sentences_of(text: str, *, min_words: int = 6, max_words: int = 60, limit: int | None = None) -> list[str]:
    """Split text into sentence-like lines for embedding (deterministic, order kept)."""
    import re

    parts = re.split(r"(?<=[.!?])\s+|\n{2,}", text)
    out = []
    for p in parts:
        words = p.split()
        if min_words <= len(words) <= max_words:
            out.append(" ".join(words))
            if limit is not None and len(out) >= limit:
                break
    return out
