"""Cutting a long text into pieces that tokenize exactly like the whole.

Tokenizing a huge document in one call costs memory in proportion to its size (the BPE
backend keeps ~150 bytes of bookkeeping per character), so `prepare` tokenizes it a piece at
a time. Where the pieces are cut matters: byte-level BPE (GPT-2's pattern) and tiktoken's
patterns split text into pre-tokens that carry at most one leading space, so a cut just
before a space that sits between two non-space characters is a pre-token boundary, and the
pieces' ids joined are the whole text's ids.
"""

from __future__ import annotations

from typing import Iterator


def chunk_bounds(text: str, start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) in pieces of at most `size` characters, cut where tokenizing the pieces
    gives the same ids as tokenizing the whole: before a space that sits between two
    non-space characters (a pre-token boundary for the byte-level BPE and tiktoken patterns,
    whose pre-tokens take at most one leading space). Failing that, after a newline; in text
    with no whitespace at all, anywhere (the ids may then differ there, the text never)."""
    while end - start > size:
        cut = _safe_cut(text, start + size // 2, start + size)
        yield start, cut
        start = cut
    if end > start:
        yield start, end


def _safe_cut(text: str, lo: int, hi: int) -> int:
    i = hi
    while (i := text.rfind(" ", lo, i)) > lo:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
    j = text.rfind("\n", lo, hi)
    return j + 1 if j >= lo else hi
