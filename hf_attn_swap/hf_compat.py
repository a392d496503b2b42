"""What differs between the transformers 5.x releases this package supports (5.20 onwards), in one place.

transformers 5.24 renamed the cache argument of every forward from ``past_key_values`` to ``cache`` (the old name is
deprecated until 5.40, with a warning on each call) and model outputs carry ``.cache`` instead of
``.past_key_values``; attention modules receive it as ``cache`` (``past_key_values`` before, ``layer_past`` in GPT-2
before).
"""

from __future__ import annotations

import inspect
from typing import Any

#: names an attention module or decoder layer may receive the cache under, newest first.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_kwarg(model: Any) -> str:
    """The name ``model``'s forward takes the cache under: ``"cache"`` from transformers 5.24, else
    ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache a forward with ``use_cache=True`` (or ``generate()``) returned, under either name; None if none."""
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def cache_in_kwargs(kwargs: dict) -> Any:
    """The cache among a module's forward kwargs, whichever name it came under; None if none."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None
