"""Readers that turn the files of a packaged corpus into clean documents (plain text, no markup).

Each reader takes the matched files of one corpus (sorted paths) and returns its documents in a fixed
order. They only strip what is not the text itself: markup, indexes, headers and tables. The split into
train/validation is not theirs to make (see :mod:`hf_attn_swap.data`).

- :func:`janeausten_novels`: the character vectors in an installed R package's lazy-load database
  (``data/Rdata.rdx`` + ``Rdata.rdb``, read by :func:`r_lazyload_strings`), one document per vector.
- :func:`pydoc_topics`: CPython's ``pydoc_data/topics.py`` (the language reference as plain text).
- :func:`jargon_file`: the Jargon File's plain-text edition.
- :func:`dictd_text`: a dictd database (``.dict.dz``: gzip-compatible), here The Devil's Dictionary.
"""

from __future__ import annotations

import ast
import gzip
import re
import struct
import zlib
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------ R lazy-load DB


class _RReader:
    """Just enough of R's binary (XDR) serialization to read vectors, lists, symbols and attributes.

    Format: R Internals, "Serialization formats". A header ``X\\n``, three version ints (plus the native
    encoding's name in version 3), then items. An item starts with a flags int: type in the low byte,
    bit 9 = has attributes, bit 10 = has tag. Reference items (type 255) point back to earlier symbols.
    """

    _NIL, _REF, _SYM, _PAIRLIST, _CHAR = 254, 255, 1, 2, 9
    _INTS, _LGL, _REAL, _STR, _LIST = 13, 10, 14, 16, 19

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.symbols = data, 0, []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> Any:
        if self.data[:2] != b"X\n":
            raise ValueError("not R binary (XDR) serialization")
        self.pos = 2
        version = self._int()
        self.pos += 8  # writer version, minimal reader version
        if version == 3:
            self.pos += 4 + self._int()  # native encoding name
        return self._item()

    def _item(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == self._NIL:
            return None
        if kind == self._REF:
            return self.symbols[(flags >> 8) - 1]
        if kind == self._SYM:
            self.symbols.append(self._item())
            return self.symbols[-1]
        if kind == self._CHAR:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8")  # levels bit 2: LATIN1
        if kind == self._PAIRLIST:  # attributes come as a pairlist: {tag: value}
            if has_attr:
                self._item()  # a pairlist's own attributes: not needed
            tag = self._item() if has_tag else None
            value = self._item()
            rest = self._item() or {}
            return {tag: value, **rest}
        if kind in (self._STR, self._LIST, self._INTS, self._LGL, self._REAL):
            n = self._int()
            if kind in (self._STR, self._LIST):
                values: Any = [self._item() for _ in range(n)]
            else:
                fmt, size = (">%dd" % n, 8) if kind == self._REAL else (">%di" % n, 4)
                values = list(struct.unpack_from(fmt, self.data, self.pos))
                self.pos += size * n
            attrs = self._item() if has_attr else {}
            names = attrs.get("names") if isinstance(attrs, dict) else None
            return dict(zip(names, values)) if names else values
        raise ValueError(f"unsupported R object type {kind} in serialized data")


def r_lazyload_strings(files: list[Path]) -> list[str]:
    """Read every character vector of an R lazy-load database as one document.

    Args:
        files: Paths that include ``Rdata.rdx`` (the index) and ``Rdata.rdb`` (the objects).

    Returns:
        One document per character vector, in name order, its elements joined by newlines.

    Raises:
        ValueError: The index or an object is not in the expected form.
    """
    by_name = {f.name: f for f in files}
    index = _RReader(gzip.decompress(by_name["Rdata.rdx"].read_bytes())).read()
    if index.get("compressed") not in ([1], [True]):
        raise ValueError(f"only zlib-compressed lazy-load databases are supported, got {index.get('compressed')}")
    blob = by_name["Rdata.rdb"].read_bytes()
    docs = []
    for name in sorted(index["variables"]):
        offset, length = index["variables"][name]
        # each object: 4-byte big-endian uncompressed length, then a zlib stream of its serialization
        value = _RReader(zlib.decompress(blob[offset + 4:offset + length])).read()
        if isinstance(value, list) and all(isinstance(v, str) or v is None for v in value):
            docs.append("\n".join(v or "" for v in value))
    return docs


_ITALIC = re.compile(r"_([^_\n]+(?:\n[^_\n]+)?)_")  # Gutenberg's _emphasis_ -> emphasis


def janeausten_novels(files: list[Path]) -> list[str]:
    """Jane Austen's novels from the R package janeaustenr: one document per novel, italics marks removed.

    Args:
        files: ``Rdata.rdx`` and ``Rdata.rdb`` of the installed package's ``data/`` folder.

    Returns:
        The six novels in object-name order (emma, mansfieldpark, ..., sensesensibility).
    """
    return [_ITALIC.sub(r"\1", novel) for novel in r_lazyload_strings(files)]


# ------------------------------------------------------------------------------- pydoc topics

_RST_RULE = re.compile(r"^\s*([*=\-~^+])\1{2,}(\s+\1{3,})*\s*$")  # heading underlines, simple-table rules
_GRID_ROW = re.compile(r"^\s*(\+[-=+]*\+|\|.*\|)\s*$")  # grid-table borders and rows
# Paragraphs shorter than this may repeat freely ("Added in version 3.8."); longer repeats are copies.
_MIN_REPEAT_CHARS = 80


def pydoc_topics(files: list[Path]) -> list[str]:
    """The language-reference topics that ``help()`` shows, as plain text, without repeated sections.

    The file is parsed, not imported, so the text read is exactly the file whose digest provenance records.
    Many topics embed others whole ("compound" holds "if", "while", ...; every topic ends with "await"'s
    neighbours, etc.): a paragraph of :data:`_MIN_REPEAT_CHARS` or more that already appeared in a longer topic
    is dropped, so no text sits on both sides of the train/validation split.

    Args:
        files: ``[.../pydoc_data/topics.py]``.

    Returns:
        One document per topic, in topic-name order; topics left empty by deduplication are omitted.
    """
    tree = ast.parse(files[0].read_text(encoding="utf-8"))
    assigned = [node.value for node in tree.body
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets)]
    if not assigned:
        raise ValueError(f"{files[0]} assigns no `topics` dict: not a pydoc_data/topics.py this reader knows")
    topics = ast.literal_eval(assigned[0])
    seen: set[str] = set()
    kept: dict[str, str] = {}
    for name in sorted(topics, key=lambda n: (-len(topics[n]), n)):  # containers before what they contain
        lines = [line for line in topics[name].splitlines() if not (_RST_RULE.match(line) or _GRID_ROW.match(line))]
        paragraphs = []
        for paragraph in re.split(r"\n[ \t]*\n", "\n".join(lines)):
            key = " ".join(paragraph.split())
            if not key or (len(key) >= _MIN_REPEAT_CHARS and key in seen):
                continue
            seen.add(key)
            paragraphs.append(paragraph.strip("\n"))
        if paragraphs:
            kept[name] = "\n\n".join(paragraphs)
    return [kept[name] for name in sorted(kept)]


# -------------------------------------------------------------------------------- Jargon File

_SECTION = re.compile(r"^(?:\S.*|  \S)$", re.M)  # a heading at column 0, or a letter of the lexicon at column 2
_BOX_DRAWING = re.compile(r"[\u2500-\u257f]")  # the file's tables (special characters, pronunciation)
# {kluge} -> kluge, also {{VAX}} and a reference broken over two lines; a C block's braces span more lines
_CROSS_REF = re.compile(r"\{\{?([^{}\n]*(?:\n[^{}\n]*)?)\}\}?")
# "Table of Contents" and its one-line entries (each a paragraph of its own), up to the first real paragraph
_CONTENTS = re.compile(r"^   Table of Contents\n(?:\n   [^\n]+\n(?=\n))*", re.M)
_PART_TITLE = re.compile(r"^ {10,}Part [IVX]+\..*$", re.M)  # centred "Part II. The Jargon Lexicon"
_MARGIN = re.compile(r"^ {1,3}", re.M)  # the body's 3-space margin; deeper indents (quotes) keep the rest
_HEADWORD = re.compile(r"^:(.+?):( //,?)?", re.M)  # ":gobble: vt." -> "gobble vt.", empty "//" pronunciation dropped


def jargon_file(files: list[Path]) -> list[str]:
    """The Jargon File's chapters, lexicon letters and appendices, without tables of contents or markup.

    Dropped: the front matter before Chapter 1, every table of contents, the centred part titles, the
    "Glossary" list of headwords, each letter's own list of headwords before its first entry, box-drawing tables,
    and the Bibliography. Markup:
    ``{cross-reference}`` braces and ``:headword:`` colons are removed.

    Args:
        files: ``[.../jargon.txt.gz]``.

    Returns:
        One document per section, in file order.
    """
    text = gzip.decompress(files[0].read_bytes()).decode("utf-8").replace("\u00a0", " ")  # "Chapter\xa01."
    start, end = text.index("\nChapter 1.") + 1, text.index("\nBibliography\n")
    body = "\n".join(line for line in text[start:end].splitlines() if not _BOX_DRAWING.search(line))
    body = _PART_TITLE.sub("", _CONTENTS.sub("", body))
    heads = [m.start() for m in _SECTION.finditer(body)] + [len(body)]
    docs = []
    for a, b in zip(heads, heads[1:]):
        heading, _, section = body[a:b].partition("\n")
        if heading == "Glossary":
            continue  # a list of every headword, nothing else
        if heading.startswith("  "):  # a lexicon letter: skip its headword list, keep the entries
            first_entry = re.search(r"^   :", section, re.M)
            section = section[first_entry.start():] if first_entry else ""
            heading = ""
        section = _HEADWORD.sub(r"\1", _MARGIN.sub("", section))
        section = _CROSS_REF.sub(r"\1", section).strip()
        if section:
            docs.append(f"{heading}\n\n{section}" if heading else section)
    return docs


# -------------------------------------------------------------------- dictd: Devil's Dictionary

# "ABASEMENT, n." at column 0; 3+ capitals so that "II., De Clem." inside an entry is not taken for one
_ENTRY = re.compile(r"^[A-Z][A-Z'\-]{2,}(?: [A-Z'\-]+)*[,.]", re.M)
_FAR_RIGHT = re.compile(r"^ {20,}(?=\S)", re.M)  # right-aligned signatures ("A.B.", "G.J.")


def dictd_text(files: list[Path]) -> list[str]:
    """The Devil's Dictionary from its dictd database: the preface, then one document per initial letter.

    The database opens with dictfmt's ``00-database-*`` entries and the e-text's banner; the text starts at
    the PREFACE. The closing ``00-database-alphabet`` entry is dropped, italics underscores are removed and
    right-aligned signatures are moved to the margin.

    Args:
        files: ``[.../devil.dict.dz]`` (dictzip is gzip-compatible).

    Returns:
        ``[preface, entries under A, entries under B, ...]``.
    """
    text = gzip.decompress(files[0].read_bytes()).decode("utf-8")
    text = text[re.search(r"^\s*PREFACE\s*$", text, re.M).end():]
    text = re.sub(r"\n\s*[a-z]{26}\s*$", "", text.rstrip())  # the alphabet entry
    text = _FAR_RIGHT.sub("", _CROSS_REF.sub(r"\1", _ITALIC.sub(r"\1", text)))  # "See {HUSBAND}."
    starts = [m.start() for m in _ENTRY.finditer(text)]
    docs, letter_start = [text[: starts[0]].strip()], starts[0]
    for nxt in starts[1:] + [len(text)]:
        if nxt == len(text) or text[nxt] != text[letter_start]:  # the next entry starts another letter
            docs.append(text[letter_start:nxt].strip())
            letter_start = nxt
    return docs
