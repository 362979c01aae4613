"""Corpus preparation: shards + meta.json, nothing dropped, a val split even for one file,
output independent of --workers, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gptkit.data import prepare as prep
from gptkit.cli import app
from gptkit.errors import GptkitError
from gptkit.data.shards import TokenShards
from gptkit.text.chunks import chunk_bounds
from gptkit.text.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

LINES = ["def f(x):\n", "    return x * 2  # 我有一个梦想\n", "\n", "The quick brown fox 👍🏽 jumps.\n", "\t\t  \n"]


def _text(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(LINES[i] for i in rng.integers(0, len(LINES), n_lines))


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("char")
    CharTokenizer.train(LINES).save(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    BPETokenizer.train([_text(400, s) for s in range(5)], vocab_size=300).save(folder)
    return folder


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 2 KB and tasks of 8 KB, so small test files exercise cutting and batching."""
    monkeypatch.setattr(prep, "PIECE_BYTES", 2048)
    monkeypatch.setattr(prep, "TASK_BYTES", 8192)


def _split_ids(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    parts = [np.fromfile(out / name, dtype=dtype) for name in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _documents(tok: Tokenizer, ids: np.ndarray) -> list[str]:
    """The texts between <|endoftext|> tokens (every document ends with one)."""
    assert len(ids) == 0 or ids[-1] == tok.eot_id
    bounds = np.flatnonzero(ids == tok.eot_id)
    return [tok.decode(ids[a + 1 if a >= 0 else 0:b].tolist()) for a, b in zip([-1, *bounds[:-1]], bounds)]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _prepare(inputs, tok_dir, out, **kw) -> dict:
    return prep.prepare([str(i) for i in inputs], tok_dir, out, **kw)


# ---------------------------------------------------------------------------- format and completeness
def test_single_file_gets_a_val_tail_and_nothing_is_dropped(tmp_path, bpe_dir, small_pieces):
    text = _text(3000)  # ~60 KB: many pieces
    src = _write(tmp_path / "one.txt", text)
    meta = _prepare([src], bpe_dir, tmp_path / "out", val_fraction=0.05)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    train, val = _documents(tok, _split_ids(tmp_path / "out", "train")), _documents(tok, _split_ids(tmp_path / "out", "val"))
    assert len(train) == len(val) == 1  # one document, cut in two
    assert train[0] + val[0] == text  # nothing dropped, nothing reordered
    assert 0.03 < len(val[0]) / len(text) < 0.07  # about the last val_fraction
    assert train[0].endswith("\n")  # cut at a line boundary
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == meta["sources"][0]["tokens"]
    assert meta["text_bytes"] == {"train": len(train[0].encode()), "val": len(val[0].encode())}


def test_meta_json_format(tmp_path, char_dir):
    _write(tmp_path / "a.txt", _text(50))
    meta = _prepare([tmp_path / "a.txt"], char_dir, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == {k: v for k, v in meta.items() if k not in ("seconds", "tokens_per_s")}
    assert set(on_disk) == {"version", "dtype", "vocab_size", "eot_id", "splits", "sources", "val_fraction",
                            "text_bytes"}
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert (on_disk["version"], on_disk["dtype"]) == (1, "uint16")
    assert (on_disk["vocab_size"], on_disk["eot_id"]) == (tok.vocab_size, tok.eot_id)
    assert on_disk["splits"]["train"] == {"shards": ["train_00000.bin"], "tokens": on_disk["splits"]["train"]["tokens"],
                                          "documents": 1}
    assert on_disk["sources"] == [{"path": str(tmp_path / "a.txt"), "documents": 1,
                                   "tokens": on_disk["splits"]["train"]["tokens"] + on_disk["splits"]["val"]["tokens"],
                                   "bad_bytes": 0}]
    for split in ("train", "val"):
        for name in on_disk["splits"][split]["shards"]:
            assert np.memmap(tmp_path / "out" / name, dtype=np.uint16, mode="r").size > 0
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_many_documents_are_assigned_whole_and_each_ends_with_eot(tmp_path, char_dir):
    texts = {tmp_path / "docs" / f"{i:03d}.md": _text(5, seed=i) + f"doc {i}\n" for i in range(200)}
    for path, text in texts.items():
        _write(path, text)
    meta = _prepare([tmp_path / "docs"], char_dir, tmp_path / "out", val_fraction=0.1)
    tok = load_tokenizer(char_dir)
    train, val = (_documents(tok, _split_ids(tmp_path / "out", s)) for s in ("train", "val"))
    assert sorted(train + val) == sorted(texts.values())  # every document whole, in exactly one split
    assert 8 <= len(val) <= 35  # ~10% of 200
    assert meta["splits"]["val"]["documents"] == len(val)
    assert [s["path"] for s in meta["sources"]] == [str(p) for p in texts]  # sorted walk order


def test_wide_vocabulary_uses_uint32(tmp_path):
    tok = CharTokenizer([chr(0x10000 + i) for i in range(70_000 - 259)])  # > 65536 ids
    tok.save(tmp_path / "wide")
    _write(tmp_path / "a.txt", "".join(tok.chars[-50:]) * 3)
    meta = _prepare([tmp_path / "a.txt"], tmp_path / "wide", tmp_path / "out")
    assert meta["dtype"] == "uint32"
    ids = _split_ids(tmp_path / "out", "train")
    assert ids.max() >= 2**16 and ids.dtype == np.uint32


def test_output_is_identical_for_any_number_of_workers(tmp_path, bpe_dir, small_pieces):
    for i in range(12):
        _write(tmp_path / "corpus" / f"{i}.txt", _text(100 * (i + 1), seed=i))
    _write(tmp_path / "corpus" / "d.jsonl", "".join(json.dumps({"text": _text(20, s)}) + "\n" for s in range(60)))
    runs = {w: tmp_path / f"out{w}" for w in (1, 2)}
    metas = {w: _prepare([tmp_path / "corpus"], bpe_dir, out, workers=w, shard_tokens=5000, val_fraction=0.1)
             for w, out in runs.items()}
    for m in metas.values():
        del m["seconds"], m["tokens_per_s"]
    assert metas[1] == metas[2]
    assert len(metas[1]["splits"]["train"]["shards"]) > 1
    for name in metas[1]["splits"]["train"]["shards"] + metas[1]["splits"]["val"]["shards"]:
        assert (runs[1] / name).read_bytes() == (runs[2] / name).read_bytes()


def test_shards_roll_over_and_concatenate_to_the_unsharded_stream(tmp_path, char_dir):
    _write(tmp_path / "a.txt", _text(300))
    one = _prepare([tmp_path / "a.txt"], char_dir, tmp_path / "one")
    many = _prepare([tmp_path / "a.txt"], char_dir, tmp_path / "many", shard_tokens=1000)
    shards = many["splits"]["train"]["shards"]
    assert len(shards) == -(-one["splits"]["train"]["tokens"] // 1000)
    assert all((tmp_path / "many" / s).stat().st_size == 2000 for s in shards[:-1])
    assert np.array_equal(_split_ids(tmp_path / "one", "train"), _split_ids(tmp_path / "many", "train"))
    # a rerun into the same folder with bigger shards leaves no stale shard behind
    _prepare([tmp_path / "a.txt"], char_dir, tmp_path / "many")
    assert sorted(p.name for p in (tmp_path / "many").glob("train_*.bin")) == ["train_00000.bin"]


def test_the_trainer_reads_the_output(tmp_path, bpe_dir):
    _write(tmp_path / "a.txt", _text(2000))
    _prepare([tmp_path / "a.txt"], bpe_dir, tmp_path / "out", val_fraction=0.1)
    shards = TokenShards.from_dir(tmp_path / "out", block_size=16, batch_size=2)
    x, y = shards.train_batch()
    assert x.shape == y.shape == (2, 16)
    assert 1 < shards.bytes_per_token() < 8


# ---------------------------------------------------------------------------- inputs
def test_jsonl_documents_and_globs(tmp_path, char_dir):
    docs = [_text(3, s) for s in range(30)]
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    lines.insert(5, "")  # blank lines are skipped
    _write(tmp_path / "data" / "a.jsonl", "\n".join(lines) + "\n")
    _write(tmp_path / "data" / "sub" / "b.txt", "plain text\n")
    meta = _prepare([str(tmp_path / "data" / "**" / "*.*")], char_dir, tmp_path / "out", val_fraction=0.2)
    tok = load_tokenizer(char_dir)
    found = _documents(tok, _split_ids(tmp_path / "out", "train")) + _documents(tok, _split_ids(tmp_path / "out", "val"))
    assert sorted(found) == sorted(docs + ["plain text\n"])
    assert [(s["path"], s["documents"]) for s in meta["sources"]] == [
        (str(tmp_path / "data" / "a.jsonl"), 30), (str(tmp_path / "data" / "sub" / "b.txt"), 1)]


def test_jsonl_errors_name_file_and_line(tmp_path, char_dir, small_pieces):
    good = [json.dumps({"text": _text(5, s)}) for s in range(200)]  # > 2 pieces before the bad line
    cases = {"not valid JSON": "{oops", "no 'text' field": json.dumps({"body": "x"}),
             "field 'text' is int": json.dumps({"text": 3})}
    for message, bad in cases.items():
        path = _write(tmp_path / "bad.jsonl", "\n".join(good + [bad] + good[:3]) + "\n")
        with pytest.raises(GptkitError, match=f"^{path}:201: {message}"):
            _prepare([path], char_dir, tmp_path / "out")


def test_text_field_option(tmp_path, char_dir):
    _write(tmp_path / "a.jsonl", json.dumps({"body": "hello"}) + "\n")
    meta = _prepare([tmp_path / "a.jsonl"], char_dir, tmp_path / "out", text_field="body")
    assert meta["sources"][0]["documents"] == 1


@pytest.mark.parametrize("content, reason", [
    (bytes(range(256)) * 40, "it holds NUL bytes"),
    ((b"text " + bytes(range(0x80, 0xff))) * 100, "96% of its first 64 KiB are not UTF-8"),
    (b"plain text\n" * 7000 + bytes(range(0x80, 0xff)) * 300, "33% of its bytes are not UTF-8"),  # past the first 64 KiB
])
def test_binary_input_is_refused_unless_allowed(tmp_path, char_dir, content, reason):
    (tmp_path / "blob.txt").write_bytes(content)
    with pytest.raises(GptkitError, match=re.escape(f"{tmp_path / 'blob.txt'}: looks like a binary file, not text "
                                                    f"({reason}); leave it out, or pass --allow-binary")):
        _prepare([tmp_path / "blob.txt"], char_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    meta = _prepare([tmp_path / "blob.txt"], char_dir, tmp_path / "out", allow_binary=True, warn=lambda m: None)
    assert meta["sources"][0]["bad_bytes"] > 0


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, char_dir):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\n\xff\xfe end\n" + "我".encode()[:2] + b"\n")
    warnings: list[str] = []
    meta = _prepare([tmp_path / "bad.txt"], char_dir, tmp_path / "out", val_fraction=0, warn=warnings.append)
    assert meta["sources"][0]["bad_bytes"] == 5
    assert warnings == [f"{tmp_path / 'bad.txt'}: 5 invalid UTF-8 bytes replaced with U+FFFD"]
    tok = load_tokenizer(char_dir)
    assert _documents(tok, _split_ids(tmp_path / "out", "train")) == ["caf\ufffd ok\n\ufffd\ufffd end\n\ufffd\ufffd\n"]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("glob", "no files match"),
    ("empty-file", "no text found"),
    ("no-text-files", "no input files found"),
    ("unreadable", "cannot read"),
    ("blank-jsonl", "no text found"),
])
def test_bad_input_is_one_line_naming_it(tmp_path, char_dir, case, message):
    target = _bad_input(tmp_path, case)
    with pytest.raises(GptkitError, match=message) as e:
        _prepare([target], char_dir, tmp_path / "out")
    assert str(target) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def _bad_input(tmp_path: Path, case: str) -> Path:
    if case == "missing":
        return tmp_path / "nope.txt"
    if case == "glob":
        return tmp_path / "*.nothing"
    if case == "empty-file":
        return _write(tmp_path / "empty.txt", "")
    if case == "no-text-files":
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "x.bin").write_bytes(b"\0\1")
        return tmp_path / "bin"
    if case == "blank-jsonl":
        return _write(tmp_path / "blank.jsonl", "\n\n")
    # a socket cannot be opened as a file, even by root (chmod 000 would not stop root)
    (tmp_path / "sockets").mkdir()
    path = tmp_path / "sockets" / "s.txt"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return tmp_path / "sockets"


def test_no_document_drawn_for_val_cuts_the_largest(tmp_path):
    vf = 0.01
    names = (tmp_path / f"{i}.txt" for i in range(10_000))
    train_only = [p for p in names if not prep._in_val(str(p), vf)][:150]  # each file < vf of the corpus
    sources = [prep.Source(str(p), 100 + i, data=b"x" * (100 + i)) for i, p in enumerate(train_only)]
    pieces = prep.plan(sources, vf)
    assert {p.source.name for p in pieces if p.split == "val"} == {sources[-1].name}
    assert sum(p.end - p.start for p in pieces) == sum(s.size for s in sources)


def test_cuts_land_on_character_boundaries_in_a_file_without_newlines(tmp_path, char_dir, small_pieces):
    text = "我有一个梦想" * 2000  # 36 KB, no newline: pieces are cut inside the line
    _write(tmp_path / "a.txt", text)
    meta = _prepare([tmp_path / "a.txt"], char_dir, tmp_path / "out", val_fraction=0.01)
    tok = load_tokenizer(char_dir)
    ids = np.concatenate([_split_ids(tmp_path / "out", "train"), _split_ids(tmp_path / "out", "val")])
    assert tok.decode(i for i in ids.tolist() if i != tok.eot_id) == text
    assert meta["splits"]["val"]["tokens"] > 1


def test_stdlib_documents():
    docs = dict(prep.stdlib_documents())
    stdlib = sysconfig.get_paths()["stdlib"]
    assert any(name.startswith("pydoc_data.topics:") for name in docs)
    assert str(Path(stdlib) / "json" / "__init__.py") in docs
    assert "def dumps(" in docs[str(Path(stdlib) / "json" / "__init__.py")]
    for skipped in ("site-packages", "/test/", "/tests/", "idle_test", "/encodings/cp1252.py", "pydoc_data/topics.py"):
        assert not any(skipped in name for name in docs), skipped
    assert 300 < len(docs) and 2e6 < sum(map(len, docs.values())) < 5e7
    assert all(text for text in docs.values())


# ---------------------------------------------------------------------------- CLI
def test_cli_train_tokenizer_then_prepare(tmp_path):
    for i in range(5):
        _write(tmp_path / "corpus" / f"{i}.py", _text(200, seed=i))
    runner = CliRunner()
    result = runner.invoke(app, ["train-tokenizer", str(tmp_path / "corpus"), "--out", str(tmp_path / "tok"),
                                 "--vocab-size", "300"])
    assert result.exit_code == 0, result.output
    assert load_tokenizer(tmp_path / "tok").special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    result = runner.invoke(app, ["prepare", str(tmp_path / "corpus"), "--tokenizer", str(tmp_path / "tok"),
                                 "--out", str(tmp_path / "out"), "--val-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert f"{meta['splits']['train']['tokens']:,} tokens" in result.output
    assert "tokens/s" in result.output


def test_cli_char_tokenizer(tmp_path):
    _write(tmp_path / "a.txt", "abc 我\n")
    result = CliRunner().invoke(app, ["train-tokenizer", str(tmp_path / "a.txt"), "--out", str(tmp_path / "tok"),
                                      "--kind", "char"])
    assert result.exit_code == 0, result.output
    assert load_tokenizer(tmp_path / "tok").encode("我") == [3 + 256 + 5]  # specials, bytes, then \n, " ", a, b, c, 我


@pytest.mark.parametrize("case", ["missing", "glob", "empty-file", "no-text-files", "unreadable", "blank-jsonl"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, char_dir, case):
    target = _bad_input(tmp_path, case)
    result = CliRunner().invoke(app, ["prepare", str(target), "--tokenizer", str(char_dir), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and str(target) in result.stderr


def test_cli_bad_options_exit_2(tmp_path, char_dir):
    _write(tmp_path / "a.txt", "text\n")
    runner = CliRunner()
    bad_kind = runner.invoke(app, ["train-tokenizer", str(tmp_path / "a.txt"), "--out", str(tmp_path / "t"),
                                   "--kind", "word"])
    assert bad_kind.exit_code == 2 and "--kind 'word'" in bad_kind.stderr
    bad_fraction = runner.invoke(app, ["prepare", str(tmp_path / "a.txt"), "--tokenizer", str(char_dir),
                                       "--out", str(tmp_path / "o"), "--val-fraction", "1.5"])
    assert bad_fraction.exit_code == 2 and "val_fraction=1.5" in bad_fraction.stderr
    no_tokenizer = runner.invoke(app, ["prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path),
                                       "--out", str(tmp_path / "o")])
    assert no_tokenizer.exit_code == 2 and "no tokenizer found" in no_tokenizer.stderr


# ---------------------------------------------------------------------------- never destructive, bounded memory
def test_failed_rerun_leaves_the_old_dataset_intact(tmp_path, char_dir):
    out = tmp_path / "out"
    meta = _prepare([_write(tmp_path / "a.txt", _text(50))], char_dir, out, val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{not json\n')
    with pytest.raises(GptkitError, match="bad.jsonl:2: not valid JSON"):
        _prepare([tmp_path / "bad.jsonl"], char_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert json.loads((out / "meta.json").read_text())["splits"] == meta["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "bad.jsonl", "out"]  # no temporary folder left
    # a successful rerun replaces it whole (no shard of the old, larger dataset survives)
    _prepare([_write(tmp_path / "b.txt", "small\n")], char_dir, out, val_fraction=0)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train_00000.bin"]


def test_a_folder_with_other_files_is_not_replaced(tmp_path, char_dir):
    _write(tmp_path / "out" / "notes.md", "mine")
    with pytest.raises(GptkitError, match="holds files prepare did not write .notes.md."):
        _prepare([_write(tmp_path / "a.txt", _text(5))], char_dir, tmp_path / "out")
    assert (tmp_path / "out" / "notes.md").read_text() == "mine"


def test_temporary_folders_of_killed_runs_are_removed(tmp_path, char_dir):
    stale = tmp_path / ".out.tmp-999999999"  # no such process
    _write(stale / "train_00000.bin", "x")
    _prepare([_write(tmp_path / "a.txt", _text(5))], char_dir, tmp_path / "out")
    assert not stale.exists()


@pytest.mark.parametrize("tokenizer", ["bpe", "char"])
def test_chunked_tokenization_equals_whole_document(tokenizer, bpe_dir, char_dir):
    tok = load_tokenizer(bpe_dir if tokenizer == "bpe" else char_dir)
    for text, same_ids in [(_text(400, seed=3) + "  double  spaces  \n\n\n end", True),
                           ("x" * 300 + _text(20), False)]:  # no whitespace to cut at: cut anywhere
        bounds = list(chunk_bounds(text, 0, len(text), 97))
        assert bounds[0][0] == 0 and bounds[-1][1] == len(text) and len(bounds) >= len(text) // 97
        assert all(0 < b - a <= 97 for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
        chunked = [i for a, b in bounds for i in tok.encode(text[a:b])]
        assert tok.decode(chunked) == text  # nothing lost or changed
        if same_ids:  # cut at pre-token boundaries: the ids of whole-text tokenization
            assert chunked == tok.encode(text)


def test_huge_jsonl_document_is_tokenized_in_pieces_without_loss(tmp_path, bpe_dir, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 512)
    monkeypatch.setattr(prep, "BATCH_CHARS", 2048)
    doc = _text(3000, seed=7)  # ~50 KB: about a hundred chunks
    _write(tmp_path / "big.jsonl", json.dumps({"text": doc}) + "\n" + json.dumps({"text": "small"}) + "\n")
    meta = _prepare([tmp_path / "big.jsonl"], bpe_dir, tmp_path / "out", val_fraction=0.1)
    tok = load_tokenizer(bpe_dir)
    train, val = (_split_ids(tmp_path / "out", s) for s in ("train", "val"))
    docs = _documents(tok, train) + _documents(tok, val)
    assert "".join(d for d in docs if d != "small") == doc and "small" in docs  # head in train, tail in val
    whole = tok.encode(doc)
    assert len(whole) - 2 <= meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] - 3 - len(
        tok.encode("small")) <= len(whole) + 2  # only the val cut itself may re-tokenize differently
    assert meta["text_bytes"]["train"] + meta["text_bytes"]["val"] == len(doc.encode()) + len(b"small")
