"""Output folders (hf_attn_swap.outputs): refused before any work, with one line; nothing of the user's is touched.

Each wiring test makes the model loader raise: a refused folder must be reported before it is ever called, and an
accepted one must reach it (so the check is neither skipped nor too strict).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hf_attn_swap import outputs
from hf_attn_swap.cli import main
from hf_attn_swap.outputs import OutputDirError, check_output_dir


class LoaderReached(ValueError):
    """Raised by the patched loader: the output check passed and the command went on to load the model."""


@pytest.fixture
def no_loading(monkeypatch):
    from hf_attn_swap import zoo
    from hf_attn_swap.eval import compare

    def refuse(*a, **k):
        raise LoaderReached("loader reached")

    monkeypatch.setattr(zoo, "load_model", refuse)
    monkeypatch.setattr(compare, "_load", refuse)


def _users_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "draft.txt").write_text("keep me")
    (folder / "data").mkdir()
    return folder


def _unchanged(folder):
    return sorted(p.name for p in folder.iterdir()) == ["data", "draft.txt"] and (
        folder / "draft.txt").read_text() == "keep me"


# --- the check itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["checkpoint", "eval", "run"])
def test_missing_and_empty_folders_are_fine_and_nothing_is_created(tmp_path, kind):
    assert check_output_dir(tmp_path / "a" / "b", kind=kind) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", kind=kind)


@pytest.mark.parametrize("kind", ["checkpoint", "eval", "run"])
def test_a_path_that_is_or_is_under_a_regular_file_is_refused(tmp_path, kind):
    f = tmp_path / "report.pdf"
    f.write_text("x")
    with pytest.raises(OutputDirError, match=rf"^{f} is a file, not a folder"):
        check_output_dir(f, kind=kind)
    with pytest.raises(OutputDirError, match=rf"^cannot create {f / 'sub' / 'dir'}: {f} is a file, not a folder$"):
        check_output_dir(f / "sub" / "dir", kind=kind)
    assert f.read_text() == "x"


_AS_NOBODY = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("outputs", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # outputs.py imports only the standard library
for kind in ("checkpoint", "eval", "run"):
    try:
        mod.check_output_dir(sys.argv[2], kind=kind)
    except mod.OutputDirError as err:
        print(err)
"""


def test_a_read_only_parent_is_refused():
    """For real: as this user, or (os.access allows root nearly everything) as nobody through setpriv."""
    base = Path(tempfile.mkdtemp())
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() != 0:
            for kind in ("checkpoint", "eval", "run"):
                with pytest.raises(OutputDirError, match=rf"^cannot write in {ro} \(permission denied\)"):
                    check_output_dir(ro / "out", kind=kind)
            return
        setpriv = shutil.which("setpriv")
        python = next((p for p in (sys.executable, "/usr/bin/python3") if os.access(p, os.X_OK) and subprocess.run(
            [setpriv or "false", "--reuid=65534", "--regid=65534", "--clear-groups", p, "-c", "pass"],
            capture_output=True).returncode == 0), None)
        if python is None:
            pytest.skip("running as root without setpriv or a Python that uid 65534 can run: os.access would allow "
                        "root to write the read-only folder, so the refusal cannot be observed")
        base.chmod(0o755)
        res = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", _AS_NOBODY,
                              outputs.__file__, str(ro / "out")], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [f"cannot write in {ro} (permission denied): choose a folder you can "
                                           "write to"] * 3
    finally:
        shutil.rmtree(base)


def test_writability_is_checked_on_the_right_folder(tmp_path, monkeypatch):
    """Which folder must be writable: the nearest existing parent (a checkpoint is written beside its target and
    renamed; eval/run write inside their folder). os.access is the only thing replaced: it lies for root."""
    asked = []
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: asked.append(p) or False)
    with pytest.raises(OutputDirError, match=rf"^cannot write in {tmp_path} \(permission denied\): choose a folder "
                       "you can write to$"):
        check_output_dir(tmp_path / "x" / "y", kind="checkpoint")
    assert asked == [tmp_path]
    existing = tmp_path / "runs"
    existing.mkdir()
    asked.clear()
    with pytest.raises(OutputDirError, match=rf"cannot write in {existing} "):
        check_output_dir(existing, kind="eval")
    asked.clear()
    with pytest.raises(OutputDirError, match=rf"cannot write in {tmp_path} "):
        check_output_dir(existing, kind="checkpoint")


def test_eval_folder_rules(tmp_path):
    mine = _users_folder(tmp_path)
    with pytest.raises(OutputDirError, match=rf"^{mine} is not empty and holds no previous comparison \(data/, "
                       r"draft.txt\): pass --overwrite \(overwrite=True\) .*or choose an empty or new folder$"):
        check_output_dir(mine, kind="eval")
    check_output_dir(mine, kind="eval", overwrite=True)
    previous = tmp_path / "results"
    previous.mkdir()
    (previous / "results.json").write_text("[]")
    (previous / "notes.md").write_text("mine")
    check_output_dir(previous, kind="eval")  # a rerun rewrites its own reports; notes.md is never touched


def test_run_folder_rules(tmp_path):
    mine = _users_folder(tmp_path)
    with pytest.raises(OutputDirError, match="holds no run of ours .*--overwrite"):
        check_output_dir(mine, kind="run")
    check_output_dir(mine, kind="run", overwrite=True)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "checkpoint-8").mkdir()
    with pytest.raises(OutputDirError, match=r"holds a previous run \(checkpoint-8/, final/\): pass --resume to "
                       "continue it, --overwrite"):
        check_output_dir(run, kind="run")
    check_output_dir(run, kind="run", resume=True)
    check_output_dir(run, kind="run", overwrite=True)


def test_many_names_are_shortened_and_a_bad_kind_is_an_error(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(8):
        (folder / f"f{i}").write_text("")
    with pytest.raises(OutputDirError, match=r"\(f0, f1, f2, f3, f4 and 3 more\)"):
        check_output_dir(folder)
    with pytest.raises(ValueError, match="kind='model': expected one of checkpoint, eval, run"):
        check_output_dir(folder, kind="model")


# --- wired into every writer, before the model is loaded ---------------------------------------------------------


def test_convert_checks_out_before_loading(tmp_path, no_loading, capsys):
    mine = _users_folder(tmp_path)
    f = tmp_path / "file"
    f.write_text("")
    for out, message in ((mine, "is not a checkpoint (data/, draft.txt)"), (f / "ckpt", "is a file, not a folder")):
        assert main(["convert", "--model", "m", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "loader reached" not in err and len(err.strip().splitlines()) == 1
    assert _unchanged(mine)
    # an existing checkpoint: refused without --overwrite, accepted with it
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_text("")
    assert main(["convert", "--model", "m", "--out", str(ckpt)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["convert", "--model", "m", "--out", str(ckpt), "--overwrite"]) == 2
    assert "loader reached" in capsys.readouterr().err


def test_eval_checks_out_before_loading(tmp_path, no_loading, capsys):
    from hf_attn_swap.eval.compare import EvalConfig, run_comparison

    mine = _users_folder(tmp_path)
    with pytest.raises(OutputDirError, match="holds no previous comparison"):
        run_comparison(EvalConfig(out=str(mine), variants="baseline"))
    with pytest.raises(LoaderReached):
        run_comparison(EvalConfig(out=str(mine), variants="baseline"), overwrite=True)
    with pytest.raises(LoaderReached):  # nothing written, nothing checked
        run_comparison(EvalConfig(out=str(mine), variants="baseline"), write=False)
    assert main(["eval", "--out", str(mine), "--variants", "baseline"]) == 2
    assert "holds no previous comparison" in capsys.readouterr().err
    assert main(["eval", "--out", str(mine), "--variants", "baseline", "--overwrite"]) == 2
    assert "loader reached" in capsys.readouterr().err
    assert _unchanged(mine)


def test_uptrain_checks_output_dir_before_loading(tmp_path, no_loading, capsys):
    from hf_attn_swap.train import UptrainConfig, uptrain

    mine = _users_folder(tmp_path)
    with pytest.raises(OutputDirError, match="holds no run of ours"):
        uptrain(UptrainConfig(output_dir=str(mine)))
    with pytest.raises(LoaderReached):
        uptrain(UptrainConfig(output_dir=str(mine)), overwrite=True)
    assert _unchanged(mine)
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    with pytest.raises(OutputDirError, match="pass --resume"):
        uptrain(UptrainConfig(output_dir=str(run)))
    with pytest.raises(LoaderReached):
        uptrain(UptrainConfig(output_dir=str(run)), resume=True)
    assert main(["uptrain", f"output_dir={run}"]) == 2
    assert "holds a previous run (stage1/)" in capsys.readouterr().err
    assert main(["uptrain", f"output_dir={run}", "--overwrite"]) == 2
    assert "loader reached" in capsys.readouterr().err
