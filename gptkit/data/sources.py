"""Where `gptkit prepare` reads its text: files, folders, globs, .jsonl and the Python stdlib.

A Source is one input (a file, or an in-memory text); resolve_inputs turns the command line's
inputs into Sources. Text is decoded as UTF-8 with each invalid byte replaced by U+FFFD and
counted; a .jsonl file holds one document per line, in a field (default "text").
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from gptkit.errors import GptkitError

STDLIB = "stdlib"  # the special input: the standard library's documentation and source code
# Files a folder walk picks up (a file named explicitly is read whatever its suffix).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp",
                 ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".html", ".css", ".toml", ".yaml", ".yml",
                 ".jsonl")
# stdlib folders that are not the library proper: third-party packages, test suites, caches,
# and pydoc_data (its topics are read as documentation text instead).
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
STDLIB_MAX_BYTES = 512 << 10
_SURROGATE_ESCAPES = re.compile("[\udc80-\udcff]")


# ---------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One input: a file on disk, or an in-memory text (the stdlib's documentation topics)."""

    name: str  # the path, as recorded in meta.json
    size: int  # bytes
    jsonl: bool = False
    data: bytes | None = None

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        with open(self.name, "rb") as f:
            f.seek(start)
            return f.read(end - start)


def resolve_inputs(inputs: Iterable[str]) -> list[Source]:
    """Files, folders (walked recursively for TEXT_SUFFIXES, skipping hidden entries), globs,
    and `stdlib`, in the order given; each file once."""
    sources: list[Source] = []
    seen: set[str] = set()
    for inp in inputs:
        for src in _expand(inp):
            key = os.path.realpath(src.name) if src.data is None else src.name
            if key not in seen:
                seen.add(key)
                sources.append(src)
    if not sources:
        raise GptkitError(f"no input files found in {' '.join(inputs) or '(no inputs)'}")
    return sources


def _expand(inp: str) -> Iterator[Source]:
    if inp == STDLIB:
        yield from _stdlib_sources()
        return
    path = Path(inp)
    if path.is_dir():
        yield from (_file_source(p) for p in _walk(path))
    elif path.exists():
        yield _file_source(path)
    elif glob.has_magic(inp):
        matches = sorted(glob.glob(inp, recursive=True))
        if not matches:
            raise GptkitError(f"{inp}: no files match")
        for m in matches:
            yield from _expand(m)
    else:
        raise GptkitError(f"{inp}: no such file or folder")


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: a deterministic order
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(TEXT_SUFFIXES):
                yield Path(root) / name


def _file_source(path: Path) -> Source:
    try:
        with open(path, "rb"):
            pass
        size = path.stat().st_size
    except OSError as e:
        raise GptkitError(f"{path}: cannot read ({e.strerror})") from None
    return Source(str(path), size, jsonl=path.suffix.lower() == ".jsonl")


def _stdlib_sources() -> Iterator[Source]:
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        data = pydoc_data.topics.topics[key].encode("utf-8")
        yield Source(f"pydoc_data.topics:{key}", len(data), data=data)
    yield from (_file_source(p) for p in _stdlib_files())


def _stdlib_files() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS)  # pruned, not walked: site-packages is big
        files += [Path(root) / n for n in sorted(names) if n.endswith(".py") and _is_library_code(Path(root) / n)]
    return files


def _is_library_code(path: Path) -> bool:
    """False for empty and huge files and generated tables (codec maps, stringprep, ...)."""
    if not 0 < path.stat().st_size <= STDLIB_MAX_BYTES:
        return False
    with open(path, "rb") as f:
        return b"generated" not in f.read(400).lower()


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """(source name, text) for the corpus every Python install has: the documentation topics
    of `pydoc_data.topics`, then the standard library's own .py files (no tests, no
    site-packages, no generated tables). `gptkit prepare stdlib` reads exactly these."""
    for src in _stdlib_sources():
        yield src.name, decode_utf8(src.read(0, src.size))[0]


def iter_documents(inputs: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """The text of every document the inputs hold, as `prepare` reads them (for training a
    tokenizer on the same text)."""
    for src in resolve_inputs(inputs):
        raw = src.read(0, src.size)
        if src.jsonl:
            yield from (text for _, text in jsonl_documents(src, 0, decode_utf8(raw)[0], text_field))
        elif raw:
            yield decode_utf8(raw)[0]


# ---------------------------------------------------------------------------- decoding
def decode_utf8(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of invalid bytes, each replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="surrogateescape")  # one escape per bad byte: countable
        return _SURROGATE_ESCAPES.subn("\ufffd", text)


BINARY_SHARE = 0.05  # invalid UTF-8 bytes above this share of a file: binary, not text with a few bad bytes
_SNIFF_BYTES = 1 << 16


def binary_reason(src: Source, bad_bytes: int | None = None) -> str | None:
    """Why src looks like a binary file rather than text (None when it does not): NUL bytes or
    more than BINARY_SHARE invalid UTF-8 (and over 64 bytes of it) in its first 64 KiB, or
    (given the count from encoding the whole file) in all of it."""
    head = src.read(0, min(src.size, _SNIFF_BYTES))
    if b"\0" in head:
        return "it holds NUL bytes"
    bad, size = (decode_utf8(head)[1], len(head)) if bad_bytes is None else (bad_bytes, src.size)
    if bad > max(BINARY_SHARE * size, 64):  # a short text with a few bad bytes is text
        return f"{100 * bad / size:.0f}% of its {'first 64 KiB' if bad_bytes is None else 'bytes'} are not UTF-8"
    return None


def refuse_binary(sources: list[Source], bad_bytes: dict[str, int] | None = None) -> None:
    """A one-line error for the first source that looks binary (see binary_reason)."""
    for src in sources:
        reason = binary_reason(src, None if bad_bytes is None else bad_bytes[src.name])
        if reason:
            raise GptkitError(f"{src.name}: looks like a binary file, not text ({reason}); leave it out, or pass "
                              "--allow-binary to encode it anyway (each invalid byte becomes U+FFFD)")


def jsonl_documents(src: Source, start: int, text: str, text_field: str) -> Iterator[tuple[int, str]]:
    """(line index, text) of each document of a .jsonl piece that begins at byte `start`."""
    for lineno, line in enumerate(_lines(text)):
        if not line or line.isspace():  # not .strip(): no copy of a huge line
            continue
        where = f"{src.name}:{_line_number(src, start, lineno)}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptkitError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise GptkitError(f"{where}: no {text_field!r} field (choose one with --text-field)")
        if not isinstance(obj[text_field], str):
            raise GptkitError(f"{where}: field {text_field!r} is {type(obj[text_field]).__name__}, expected a string")
        if obj[text_field]:
            yield lineno, obj[text_field]


def _lines(text: str) -> Iterator[str]:
    """text.split("\n") lazily; a piece that is one (huge) line is not copied."""
    if text.find("\n", 0, len(text) - 1) < 0:
        yield text  # json.loads allows the trailing newline
        return
    pos = 0
    while pos <= len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        yield text[pos:end]
        pos = end + 1


def _line_number(src: Source, start: int, lineno_in_piece: int) -> int:
    """1-based line number in the file (reads what precedes the piece; only on the error path)."""
    return src.read(0, start).count(b"\n") + lineno_in_piece + 1 if start else lineno_in_piece + 1
