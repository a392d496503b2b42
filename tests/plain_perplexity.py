"""An independent perplexity: plain forwards and log-softmax, no code from hf_attn_swap.eval.

Tests compare the package's figures with it, so a wrong window, a dropped token or a wrong normalisation fails
them (a bound such as ``ppl > 1`` would not)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def plain_perplexity(model: torch.nn.Module, ids: torch.Tensor, context: int) -> float:
    """exp(mean NLL) of ``ids[1:]``, each token predicted from at most ``context`` tokens before it, scoring
    ``context - 1`` new tokens per forward after the first window (the package's stride=context convention)."""
    ids = ids.reshape(-1)
    nll, count, pos = 0.0, 0, 1
    while pos < ids.numel():
        stop = min(pos + context - 1, ids.numel())  # score tokens pos..stop-1
        window = ids[max(0, stop - context): stop]
        logp = torch.log_softmax(model(window[None]).logits[0, :-1].double(), dim=-1)
        token_nll = -logp.gather(1, window[1:, None])[:, 0]
        nll += token_nll[-(stop - pos):].sum().item()
        count += stop - pos
        pos = stop
    return math.exp(nll / count)
