"""`gptkit train-tokenizer` and `prepare`: a tokenizer and token shards from a corpus."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gptkit.cli.common import app, human
from gptkit.errors import GptkitError


# ---------------------------------------------------------------------------- tokenizer and corpus
_INPUTS_HELP = ("text files, folders (walked recursively for .txt .text .md .markdown .rst .tex .py .pyi .c .h .cc "
                ".cpp .hpp .js .ts .java .go .rs .sh .html .css .toml .yaml .yml .jsonl; hidden entries skipped), "
                "globs ('data/**/*.md'), .jsonl files (one document per line), or `stdlib`: the Python "
                "standard library's documentation and source code")


@app.command("train-tokenizer")
def train_tokenizer(
    inputs: Annotated[list[str], typer.Argument(help=_INPUTS_HELP)],
    out: Annotated[Path, typer.Option(help="folder to write the tokenizer to")],
    kind: Annotated[str, typer.Option(help="bpe (byte-level BPE) | char (one token per character)")] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size, special tokens included")] = 4096,
    text_field: Annotated[str, typer.Option(help="the text field of .jsonl inputs")] = "text",
) -> None:
    """Train a tokenizer on a corpus; <|endoftext|>, <|im_start|>, <|im_end|> are reserved."""
    import itertools
    import time

    from gptkit.data.sources import iter_documents
    from gptkit.text.tokenizer import BPETokenizer, CharTokenizer

    t0 = time.perf_counter()
    documents = iter_documents(inputs, text_field)
    first = next(documents, None)
    if first is None:
        raise GptkitError(f"no text found in {' '.join(inputs)}")
    texts = itertools.chain([first], documents)
    if kind == "bpe":
        tok = BPETokenizer.train(texts, vocab_size)
    elif kind == "char":
        tok = CharTokenizer.train(texts)
    else:
        raise GptkitError(f"--kind {kind!r}: expected bpe or char")
    tok.save(out)
    typer.echo(f"{kind} tokenizer, vocab_size {tok.vocab_size}, special tokens {tok.special_tokens}, "
               f"trained in {time.perf_counter() - t0:.1f}s; saved to {out}")


@app.command()
def prepare(
    inputs: Annotated[list[str], typer.Argument(help=_INPUTS_HELP)],
    tokenizer: Annotated[Path, typer.Option(help="a tokenizer folder (gptkit train-tokenizer, GPT-2 files, ...)")],
    out: Annotated[Path, typer.Option(help="folder for the token shards and meta.json")],
    text_field: Annotated[str, typer.Option(help="the text field of .jsonl inputs")] = "text",
    val_fraction: Annotated[float, typer.Option(help="share of documents (or of a large document's tail) "
                                                     "held out for validation")] = 0.005,
    workers: Annotated[int, typer.Option(help="encoding processes (1: this process; BPE then uses all cores)")] = 1,
    shard_tokens: Annotated[int, typer.Option(help="tokens per shard file")] = 100_000_000,
    allow_binary: Annotated[bool, typer.Option(help="encode files that look binary (NUL bytes, over 5% invalid "
                                                    "UTF-8) instead of refusing them")] = False,
) -> None:
    """Tokenize a corpus into train/val token shards (uint16/uint32 memmaps) plus meta.json."""
    from gptkit.checkpoint.rundir import resolve_checkpoint
    from gptkit.data.prepare import prepare as run

    # a checkpoint's tokenizer may be named by its run folder: prepare reads the step folder it resolves to
    meta = run(inputs, resolve_checkpoint(tokenizer), out, text_field=text_field, val_fraction=val_fraction, workers=workers,
               shard_tokens=shard_tokens, progress=sys.stderr.isatty(), allow_binary=allow_binary,
               warn=lambda m: typer.echo(f"warning: {m}", err=True))
    for split, s in meta["splits"].items():
        typer.echo(f"{split:5s} {s['tokens']:>12,} tokens  {s['documents']:>8,} documents  "
                   f"{len(s['shards'])} shard(s)  {meta['text_bytes'][split]:,} text bytes")
    typer.echo(f"{len(meta['sources'])} source(s), dtype {meta['dtype']}, vocab {meta['vocab_size']}; "
               f"{meta['seconds']:.1f}s, {human(meta['tokens_per_s'])} tokens/s; wrote {out}/meta.json")
