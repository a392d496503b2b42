"""Public names that load on first use (PEP 562), shared by the package and its ``eval``/``train`` subpackages.

``hf-attn-swap --help`` imports these packages and must not pay for torch and transformers (seconds), so each
``__init__`` maps its public names to the submodule defining them and imports that submodule only when a name is
first read; ``from hf_attn_swap import swap_attention`` works exactly as an eager import would.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(namespace: dict[str, Any], exports: Mapping[str, str],
                 submodules: Iterable[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose ``exports`` (name -> submodule) load on first use.

    Args:
        namespace: the package's ``globals()``; a loaded name is cached there, so ``__getattr__`` runs once per name.
        exports: public name -> the submodule (relative dotted path) that defines it.
        submodules: submodules exported as such (``hf_attn_swap.progress``).
    """
    package = namespace["__name__"]
    submodules = tuple(submodules)

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | set(submodules))

    return __getattr__, __dir__
