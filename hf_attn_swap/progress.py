"""Progress bars for every step that takes more than a few seconds: one switch, one helper.

The library is silent by default (a library must not write to a caller's terminal unasked); the command line turns the
bars on. Ways to turn them on, from the narrowest:

* ``progress=True`` on a call that takes it (:func:`hf_attn_swap.perplexity`, ``passkey_accuracy``, ...): that call;
* :func:`enable` (``hf_attn_swap.progress.enable()``): every step in this process, until ``enable(False)``;
* the environment variable ``HF_ATTN_SWAP_PROGRESS=1``, read at each step, when :func:`enable` was never called.

Bars are tqdm bars on stderr with a rate and an estimate of the time left; stdout stays clean for results.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

ENV = "HF_ATTN_SWAP_PROGRESS"
_TRUE = {"1", "true", "yes", "on"}

# None: never set in this process, so the environment variable decides.
_enabled: bool | None = None


def enable(on: bool = True) -> None:
    """Turn progress bars on (or off with ``on=False``) for every step of this process.

    The command line calls ``enable(True)``; a library user calls it to see bars from ``swap_attention(...,
    strategy="fit")``, perplexity, passkey, timing and layerwise transfer. Overrides ``HF_ATTN_SWAP_PROGRESS``.

    Args:
        on: whether bars are shown.
    """
    global _enabled
    _enabled = bool(on)


def is_enabled() -> bool:
    """Whether bars are shown by default: the last :func:`enable`, else ``HF_ATTN_SWAP_PROGRESS`` (off if unset)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV, "").strip().lower() in _TRUE


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    force: bool = False,
    **kwargs: Any,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual bar: ``bar.update(n)``), drawn on stderr only when enabled.

    When disabled the returned object is still a tqdm (``disable=True``): iterating, ``update``, ``set_postfix`` and
    ``close`` cost nothing and print nothing, so callers never branch on the switch.

    Args:
        iterable: what to iterate; None for a manual bar (then pass ``total``).
        desc: what the step does, shown at the left of the bar.
        total: number of units (default ``len(iterable)`` where it has one); with it tqdm shows the time left.
        unit: name of one unit (``"layer"``, ``"window"``...).
        force: show the bar even when disabled (a call's own ``progress=True``).
        **kwargs: passed to ``tqdm`` (e.g. ``leave=False``).

    Returns:
        A ``tqdm`` instance; use it as an iterable or as a context manager.
    """
    from tqdm.auto import tqdm  # deferred: importing the package stays cheap

    # disable=None would mean "off when stderr is not a terminal": the switch, not the terminal, decides here.
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not (force or is_enabled()), **kwargs)


__all__ = ["ENV", "enable", "is_enabled", "progress"]
