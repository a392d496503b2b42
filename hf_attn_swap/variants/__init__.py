"""Built-in attention variants; importing this package registers them."""

from . import gqa  # noqa: F401
