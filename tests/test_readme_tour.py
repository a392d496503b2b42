"""The README's API tour, copied into a file, runs as a script: exit status 0 and the outputs its comments promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tour_source() -> str:
    """The first ```python block under the README's "## API tour" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## API tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the API tour has no python block"
    return blocks[0]


def test_tour_is_found_and_catches_the_undo_error():
    src = tour_source()
    compile(src, "README.md (API tour)", "exec")  # valid Python as it stands
    assert "unswap_attention(model)" in src and "except ValueError" in src


@pytest.mark.real
def test_readme_api_tour_runs_as_a_script(tmp_path, smollm2):
    # smollm2: the session fixture makes sure the weights are in the cache (fetched once) before the child loads them.
    script = tmp_path / "tour.py"
    script.write_text(tour_source())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "['flash', 'gqa', 'linear', 'mqa', 'sliding_window', 'sparse']"
    assert lines[1] == str([1] * 30)  # every layer of SmolLM2 left with one KV head
    assert lines[-1].startswith("cannot undo gqa") and "reload the original checkpoint" in lines[-1]
    assert (tmp_path / "out" / "mqa" / "config.json").is_file()  # the tour writes under ./out (git-ignored)
    # progress.enable() in the tour: the fit conversion's bars went to stderr, never to stdout.
    assert "calibration, layer by layer: 100%" in proc.stderr and "layer/s" not in proc.stdout
