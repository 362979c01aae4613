"""Corpus preparation: text files, folders, globs, .jsonl and the Python stdlib -> token shards.
Inputs are found and read by sources.py; shards.ShardWriter writes the shards.

Output (read by `gptkit.data.shards.TokenShards` and by later stages; keep it stable):

    OUT/train_00000.bin ...  raw token ids, uint16 when vocab_size <= 65536 else uint32
    OUT/val_00000.bin ...
    OUT/tokenizer/           a copy of the tokenizer, so the folder is self-contained
    OUT/meta.json            version, dtype, vocab_size, eot_id, splits, sources, val_fraction, text_bytes

Every document is followed by <|endoftext|>. A document goes to the validation split with
probability val_fraction, decided by a hash of its source name (and line offset for .jsonl),
so the split does not depend on the order or number of workers. A document larger than
val_fraction of the whole corpus would make the split lumpy (one 1 MB file is either all
train or all val), so it is cut instead: its last val_fraction goes to val, the rest to train.

Streaming: sources are cut into pieces of about PIECE_BYTES at line boundaries, pieces are
grouped into tasks, and worker processes encode tasks in order (Pool.imap) while this
process appends the tokens to the shards. Nothing holds the whole corpus in memory, and
the output is byte-identical for any number of workers. A huge .jsonl document (one line) is
held as text but tokenized CHUNK_CHARS at a time, cut at pre-token boundaries, so its ids
equal whole-document tokenization and memory stays near the plain-text path's.

Never destructive: the dataset is built in `.OUT.tmp-PID/` beside OUT and swapped in (two
renames) only when complete, so a failed or killed re-run leaves the old dataset as it was;
temporary folders of killed runs are removed at the next start.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gptkit.data.shards import ShardWriter, token_dtype
from gptkit.data.sources import Source, decode_utf8, jsonl_documents, refuse_binary, resolve_inputs
from gptkit.data.sources import stdlib_documents  # noqa: F401  (what `prepare stdlib` reads, also named here)
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_json, swap_in, temp_folder_beside
from gptkit.text.chunks import chunk_bounds
from gptkit.text.tokenizer import Tokenizer, load_tokenizer

META_VERSION = 1
PIECE_BYTES = 1 << 20  # a worker's unit of work; big files are cut into pieces this size
TASK_BYTES = 1 << 20  # pieces are grouped into tasks, so small files do not cost one round trip each
SCAN_BYTES = 64 << 10  # how far to look for a line end before cutting inside a (very long) line
# A document is tokenized in pieces of at most CHUNK_CHARS characters, BATCH_CHARS per backend
# call: the BPE backend needs ~150 bytes per input character while it works, so this bounds
# memory whatever the size of one .jsonl document (see BENCHMARKS.md).
CHUNK_CHARS = 256 << 10
BATCH_CHARS = 1 << 20
DEFAULT_SHARD_TOKENS = 100_000_000
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Piece:
    source: Source
    start: int
    end: int
    split: str  # "train" or "val"; "" for .jsonl, whose lines are assigned one by one
    ends_doc: bool = False  # append <|endoftext|> after it


def _in_val(key: str, val_fraction: float) -> bool:
    """A deterministic coin with P(heads) = val_fraction."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def plan(sources: list[Source], val_fraction: float) -> list[Piece]:
    """Cut every source into pieces and decide which split each piece of plain text feeds."""
    big = val_fraction * sum(s.size for s in sources)  # documents larger than this are cut
    splits = {s.name: ("cut" if val_fraction and s.size > big else "val" if _in_val(s.name, val_fraction)
                       else "train") for s in sources if not s.jsonl and s.size}
    if val_fraction and splits and "val" not in splits.values() and "cut" not in splits.values() \
            and not any(s.jsonl for s in sources):
        # no document drew val: cut the largest one, so val is never empty
        largest = max((s for s in sources if s.name in splits), key=lambda s: s.size)
        splits[largest.name] = "cut"
    pieces: list[Piece] = []
    for src in sources:
        if src.jsonl:
            pieces += _pieces(src, 0, src.size, "", lines_only=True, ends_doc=False)
        elif splits.get(src.name) == "cut":
            cut = _val_cut(src, val_fraction)
            pieces += _pieces(src, 0, cut, "train") + _pieces(src, cut, src.size, "val")
        elif src.size:
            pieces += _pieces(src, 0, src.size, splits[src.name])
    return pieces


def _pieces(src: Source, start: int, end: int, split: str, lines_only: bool = False,
            ends_doc: bool = True) -> list[Piece]:
    """[start, end) in pieces of about PIECE_BYTES; the last one ends the document."""
    if start >= end:
        return []
    bounds = [start]
    while end - bounds[-1] > PIECE_BYTES:
        cut = _cut(src, bounds[-1] + PIECE_BYTES, end, lines_only)
        if not bounds[-1] < cut < end:
            break
        bounds.append(cut)
    bounds.append(end)
    return [Piece(src, a, b, split, ends_doc and b == end) for a, b in zip(bounds, bounds[1:])]


def _val_cut(src: Source, val_fraction: float) -> int:
    """Where the last val_fraction of a document begins: a line start, or a character start
    when there is none nearby; always leaves at least one byte for val."""
    pos = min(src.size - 1, int(src.size * (1 - val_fraction)))
    return _cut(src, pos, src.size - 1, lines_only=False)


def _cut(src: Source, pos: int, end: int, lines_only: bool) -> int:
    """A place to cut at or after pos: just after the next newline before `end` (searched up to
    SCAN_BYTES away unless lines_only), else the start of the character at pos (lines_only: end)."""
    limit = end if lines_only else min(end, pos + SCAN_BYTES)
    while pos < limit:
        chunk = src.read(pos, min(limit, pos + SCAN_BYTES))
        i = chunk.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(chunk)
    return end if lines_only else _char_start(src, min(pos, end))


def _char_start(src: Source, pos: int) -> int:
    """pos, moved back over UTF-8 continuation bytes (10xxxxxx) to the start of its character."""
    lo = max(0, pos - 3)
    window = src.read(lo, pos + 1)
    for i in range(len(window) - 1, -1, -1):
        if window[i] & 0xC0 != 0x80:
            return lo + i
    return pos


def _tasks(pieces: list[Piece]) -> list[list[Piece]]:
    tasks: list[list[Piece]] = [[]]
    size = 0
    for p in pieces:
        if size >= TASK_BYTES:
            tasks.append([])
            size = 0
        tasks[-1].append(p)
        size += p.end - p.start
    return [t for t in tasks if t]


# ---------------------------------------------------------------------------- encoding (workers)
@dataclass
class PieceResult:
    ids: dict[str, list[np.ndarray]]  # split -> token id arrays, documents followed by <|endoftext|>
    text_bytes: dict[str, int]
    eots: dict[str, int]  # documents (or document parts) per split
    documents: int  # documents that end in this piece
    bad_bytes: int


# (split, text, start, end, followed by eot): the characters text[start:end] go to split
Segment = tuple[str, str, int, int, bool]


class _Encoder:
    """Turns a task (a list of pieces) into token ids. Runs in the workers, or in-process."""

    def __init__(self, tokenizer: Tokenizer, val_fraction: float, big_bytes: float, text_field: str):
        self.tok, self.eot = tokenizer, tokenizer.eot_id
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.val_fraction, self.big_bytes, self.text_field = val_fraction, big_bytes, text_field

    def __call__(self, task: list[Piece]) -> list[PieceResult]:
        segments: list[tuple[int, Segment]] = []  # (piece index, segment)
        results = []
        for k, piece in enumerate(task):
            segs, docs, bad = self._segments(piece)  # the piece's raw text is freed on return
            segments += [(k, seg) for seg in segs]
            results.append(PieceResult({s: [] for s in SPLITS}, {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS},
                                       docs, bad))
        eot = np.array([self.eot], dtype=self.dtype)
        for (k, (split, _, _, _, ends)), (ids, n_bytes) in zip(segments, self._encode([s for _, s in segments])):
            results[k].ids[split] += ids + [eot] if ends else ids
            results[k].text_bytes[split] += n_bytes
            results[k].eots[split] += int(ends)
        return results

    def _segments(self, piece: Piece) -> tuple[list[Segment], int, int]:
        """The piece's segments, the number of documents that end in it, its invalid bytes."""
        text, bad = decode_utf8(piece.source.read(piece.start, piece.end))
        if piece.source.jsonl:
            documents = list(self._jsonl_segments(piece, text))
            docs = len({lineno for lineno, *_ in documents})  # a cut document yields two segments
            return [seg for _, *seg in documents], docs, bad
        docs = int(piece.end == piece.source.size)  # a cut document ends once, in val
        return [(piece.split, text, 0, len(text), piece.ends_doc)], docs, bad

    def _encode(self, segments: list[Segment]) -> list[tuple[list[np.ndarray], int]]:
        """(token id arrays, UTF-8 bytes) per segment. Long texts are cut into chunks (see
        _chunk_bounds) and chunks are encoded BATCH_CHARS at a time: one batch call lets the
        BPE backend spread the work over all cores, and the bound keeps its memory small."""
        arrays: list[list[np.ndarray]] = [[] for _ in segments]
        n_bytes = [0] * len(segments)
        batch: list[tuple[int, str]] = []
        chars = 0
        for i, (_, text, start, end, _) in enumerate(segments):
            for a, b in chunk_bounds(text, start, end, CHUNK_CHARS):
                batch.append((i, text[a:b]))
                chars += b - a
                if chars >= BATCH_CHARS:
                    self._encode_batch(batch, arrays, n_bytes)
                    batch, chars = [], 0
        self._encode_batch(batch, arrays, n_bytes)
        return list(zip(arrays, n_bytes))

    def _encode_batch(self, batch: list[tuple[int, str]], arrays: list[list[np.ndarray]], n_bytes: list[int]) -> None:
        for (i, chunk), ids in zip(batch, self.tok.encode_batch([c for _, c in batch])):
            arrays[i].append(np.array(ids, dtype=self.dtype))
            n_bytes[i] += len(chunk.encode("utf-8"))

    def _jsonl_segments(self, piece: Piece, text: str) -> Iterator[tuple[int, str, str, int, int, bool]]:
        """(line index, split, text, start, end, True) per document; a document too big for
        whole-document assignment yields its head for train and its tail for val."""
        for lineno, doc in jsonl_documents(piece.source, piece.start, text, self.text_field):
            if self.val_fraction and len(doc) > self.big_bytes / 4 and _utf8_len(doc) > self.big_bytes:
                cut = _val_cut_chars(doc, f"{piece.source.name}:{lineno}", self.val_fraction)
                if cut:
                    yield lineno, "train", doc, 0, cut, True
                yield lineno, "val", doc, cut, len(doc), True
            else:
                key = f"{piece.source.name}:{piece.start}:{lineno}"  # pieces do not depend on --workers
                yield lineno, "val" if _in_val(key, self.val_fraction) else "train", doc, 0, len(doc), True


def _utf8_len(text: str) -> int:
    if text.isascii():  # O(1) in CPython: no copy for the common case
        return len(text)
    return sum(len(text[i:i + CHUNK_CHARS].encode("utf-8")) for i in range(0, len(text), CHUNK_CHARS))


def _val_cut_chars(doc: str, name: str, val_fraction: float) -> int:
    """_val_cut of a document held as text, as a character index."""
    if doc.isascii():  # byte and character offsets agree: no encoded copy of a huge document
        src = Source(name, len(doc))
        return _val_cut(_TextWindow(src, doc), val_fraction)
    data = doc.encode("utf-8")
    cut = _val_cut(Source(name, len(data), data=data), val_fraction)
    return len(doc) - len(data[cut:].decode("utf-8"))


@dataclass(frozen=True)
class _TextWindow:
    """An ASCII text read as bytes, a window at a time (what _cut needs of a Source)."""

    src: Source
    text: str

    @property
    def size(self) -> int:
        return self.src.size

    def read(self, start: int, end: int) -> bytes:
        return self.text[start:end].encode("ascii")


_WORKER: _Encoder | None = None  # the worker process's encoder, set once by _init_worker


def _init_worker(tokenizer_dir: str, val_fraction: float, big_bytes: float, text_field: str) -> None:
    global _WORKER
    _WORKER = _Encoder(load_tokenizer(tokenizer_dir), val_fraction, big_bytes, text_field)


def _run_task(task: list[Piece]) -> list[PieceResult]:
    assert _WORKER is not None
    return _WORKER(task)


# ---------------------------------------------------------------------------- output
@dataclass
class _SourceStats:
    documents: int = 0
    tokens: int = 0
    bad_bytes: int = 0


@dataclass
class _Totals:
    tokens: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    documents: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    text_bytes: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})


# ---------------------------------------------------------------------------- the stage
def prepare(inputs: list[str], tokenizer_dir: str | os.PathLike, out: str | os.PathLike, *,
            text_field: str = "text", val_fraction: float = 0.005, workers: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = False, allow_binary: bool = False,
            warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr)) -> dict:
    """Tokenize the inputs into OUT (see the module docstring); returns meta.json plus timing.
    tokenizer_dir is a tokenizer folder or a checkpoint's step folder (`gptkit prepare` resolves run folders)."""
    if not 0 <= val_fraction < 1:
        raise GptkitError(f"val_fraction={val_fraction} must be in [0, 1)")
    if workers < 1 or shard_tokens < 1:
        raise GptkitError(f"workers={workers} and shard_tokens={shard_tokens} must be at least 1")
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir)
    sources = resolve_inputs(inputs)
    if not allow_binary:  # before any work: a binary file would become shards of U+FFFD
        refuse_binary(sources)
    pieces = plan(sources, val_fraction)
    if not pieces:
        raise GptkitError(f"no text found in {' '.join(inputs)} (all files are empty)")
    final = Path(out)
    _check_target(final)
    out = temp_folder_beside(final)  # swapped in only when complete
    try:
        meta = _prepare_into(out, inputs, tok, sources, pieces, text_field, val_fraction, workers, shard_tokens,
                             progress, warn)
        if not allow_binary:  # binary past the first 64 KiB shows in the count of the whole file
            refuse_binary(sources, {m["path"]: m["bad_bytes"] for m in meta["sources"]})
        swap_in(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    n_tokens = sum(meta["splits"][s]["tokens"] for s in SPLITS)
    return {**meta, "seconds": seconds, "tokens_per_s": n_tokens / max(seconds, 1e-9)}


def _prepare_into(out: Path, inputs: list[str], tok: Tokenizer, sources: list[Source], pieces: list[Piece],
                  text_field: str, val_fraction: float, workers: int, shard_tokens: int, progress: bool,
                  warn: Callable[[str], None]) -> dict:
    eot = tok.eot_id
    tok.save(out / "tokenizer")
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    stats = {s.name: _SourceStats() for s in sources}
    totals = _Totals()
    big = val_fraction * sum(s.size for s in sources)
    results = _encode_all(_tasks(pieces), tok, str(out / "tokenizer"), (val_fraction, big, text_field), workers)
    from tqdm import tqdm

    with tqdm(total=sum(p.end - p.start for p in pieces), unit="B", unit_scale=True, disable=not progress,
              file=sys.stderr, desc="prepare") as bar:
        for piece, r in results:
            _record(piece, r, writers, stats[piece.source.name], totals)
            bar.update(piece.end - piece.start)
    shards = {s: w.close() for s, w in writers.items()}
    if not sum(totals.documents.values()):
        raise GptkitError(f"no text found in {' '.join(inputs)}")
    for name, st in stats.items():
        if st.bad_bytes:
            warn(f"{name}: {st.bad_bytes} invalid UTF-8 bytes replaced with U+FFFD")
    meta = {
        "version": META_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eot_id": eot,
        "splits": {s: {"shards": shards[s], "tokens": totals.tokens[s], "documents": totals.documents[s]}
                   for s in SPLITS},
        "sources": [{"path": name, "documents": st.documents, "tokens": st.tokens, "bad_bytes": st.bad_bytes}
                    for name, st in stats.items()],
        "val_fraction": val_fraction, "text_bytes": totals.text_bytes,
    }
    atomic_write_json(out / "meta.json", meta)  # last: its presence means the shards are complete
    return meta


def _encode_all(tasks: list[list[Piece]], tok: Tokenizer, tokenizer_dir: str, settings: tuple,
                workers: int) -> Iterator[tuple[Piece, PieceResult]]:
    """(piece, result) in input order, from worker processes or (workers=1) this one."""
    if workers == 1 or len(tasks) == 1:
        encoder = _Encoder(tok, *settings)
        for task in tasks:
            yield from zip(task, encoder(task))
        return
    import multiprocessing

    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir, *settings)) as pool:
        for task, results in zip(tasks, pool.imap(_run_task, tasks)):
            yield from zip(task, results)


def _record(piece: Piece, r: PieceResult, writers: dict[str, ShardWriter], st: _SourceStats, totals: _Totals) -> None:
    for s in SPLITS:
        n = 0
        for ids in r.ids[s]:
            writers[s].write(ids)
            n += len(ids)
        totals.tokens[s] += n
        totals.documents[s] += r.eots[s]
        totals.text_bytes[s] += r.text_bytes[s]
        st.tokens += n
    st.documents += r.documents
    st.bad_bytes += r.bad_bytes


_DATASET_FILE = re.compile(r"^(meta\.json|tokenizer|(train|val)_\d{5}\.bin|\..*\.tmp)$")


def _check_target(out: Path) -> None:
    """OUT is replaced as a whole: refuse a folder holding anything `prepare` did not write."""
    if out.exists() and not out.is_dir():
        raise GptkitError(f"{out}: exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if not _DATASET_FILE.match(p.name)) if out.is_dir() else []
    if foreign:
        raise GptkitError(f"{out}: holds files prepare did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty --out")
