"""Started by tests/test_distributed.py under ``accelerate launch``: runs ``hf-attn-swap <argv>`` (the real CLI) and
records every write this process makes under ``$DIST_TEST_OUT`` (Python audit events: opens for writing, folder
creation, renames, deletions) to ``$DIST_TEST_LOG/rank<R>.json``, so the test can tell which process wrote what.

Writes made inside C extensions without a Python call (safetensors' file body) raise no audit event, but every save
here ends in a Python ``os.rename``/``os.replace``/``os.mkdir``/``open``, which does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.unlink", "shutil.rmtree",
                "shutil.move", "shutil.copyfile", "os.truncate", "os.symlink", "os.link"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> int:
    out = os.path.abspath(os.environ["DIST_TEST_OUT"])
    log = Path(os.environ["DIST_TEST_LOG"])
    rank = int(os.environ.get("RANK", "0"))
    writes: list[list[str]] = []

    def under_out(path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        p = os.path.abspath(os.fsdecode(path))
        return p == out or p.startswith(out + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            if writing and under_out(path):
                writes.append([event, os.fsdecode(path)])
        elif event in _PATH_EVENTS:
            for path in args[:2]:
                if under_out(path):
                    writes.append([event, os.fsdecode(path)])
                    break

    sys.addaudithook(hook)
    from hf_attn_swap.cli import main as cli

    try:
        return cli(sys.argv[1:])
    finally:
        log.mkdir(parents=True, exist_ok=True)
        (log / f"rank{rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    sys.exit(main())
