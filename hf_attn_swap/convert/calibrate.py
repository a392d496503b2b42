"""Calibration statistics: second moments of what each attention module reads, on real text."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from ..progress import progress

logger = logging.getLogger(__name__)


def _as_batches(calibration: Any) -> Iterable[dict[str, torch.Tensor]]:
    if isinstance(calibration, torch.Tensor):
        ids = calibration if calibration.dim() == 2 else calibration[None]
        for row in ids.split(1 if ids.shape[1] > 1024 else 4):
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


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: list[nn.Module], calibration: Any) -> tuple[list[torch.Tensor], int]:
    """``E[x x^T]`` of each module's input ``hidden_states``, with a trailing constant-1 coordinate.

    The extra coordinate lets the fit treat biases as weights of a constant input. Padding positions (where an
    ``attention_mask`` in the batch is 0) are excluded.

    Returns:
        (one ``(E+1, E+1)`` float64 matrix per module, number of tokens seen)
    """
    sums: list[torch.Tensor | None] = [None] * len(modules)
    keep: dict[str, torch.Tensor | None] = {"mask": None}
    tokens = 0

    def make_hook(i: int):
        def hook(_mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            x = x.detach().double().reshape(-1, x.shape[-1])
            if keep["mask"] is not None:
                x = x[keep["mask"]]
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
            acc = x.mT @ x
            sums[i] = acc if sums[i] is None else sums[i] + acc

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device  # calibration ids arrive on the CPU; the model may be elsewhere
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in _as_batches(calibration)]
        for batch in progress(batches, desc="calibration", unit="batch"):
            mask = batch.get("attention_mask")
            keep["mask"] = None if mask is None else mask.reshape(-1).bool()
            n = int(batch["input_ids"].numel() if mask is None else mask.sum())
            tokens += n
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0 or any(s is None for s in sums):
        raise ValueError("calibration produced no activations: pass at least one non-empty batch of input ids")
    # DEBUG: the swap that calibrates logs one INFO line itself (the token count is in its record).
    logger.debug("calibration: %d tokens through %d attention modules", tokens, len(modules))
    return [s / tokens for s in sums], tokens
