"""Built-in attention variants; importing this package registers them."""

from . import gqa  # noqa: F401
from . import sliding_window  # noqa: F401
from . import linear  # noqa: F401
from . import flash  # noqa: F401
from . import sparse  # noqa: F401
