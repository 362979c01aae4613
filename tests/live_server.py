"""A real server for tests: a tiny model served by uvicorn on 127.0.0.1 (a free port) in a
thread of the test process, so tests can look at its engine while they talk HTTP to it."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import torch

from gptkit.config import ModelConfig
from gptkit.engine import Engine
from gptkit.model import GPT
from gptkit.tokenizer import EOT, BPETokenizer, CharTokenizer, Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 我有一个梦想。\n"
        "def add(a, b):\n    return a + b\n") * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_engine(tok: Tokenizer, *, context: int = 64, max_batch: int = 4, **kw) -> Engine:
    """An untrained 1-layer model: its text is noise, but every code path runs."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=context, n_layer=1, n_head=2, n_embd=32))
    kw.setdefault("token_bytes", tok.token_bytes)
    return Engine(model, max_batch=max_batch, eos_ids=(), **kw)


def bpe_tokenizer() -> BPETokenizer:
    return BPETokenizer.train([TEXT], vocab_size=300)  # reserves <|endoftext|>, <|im_start|>, <|im_end|>


def plain_tokenizer() -> CharTokenizer:
    """A tokenizer without chat tokens, like GPT-2's."""
    return CharTokenizer(sorted(set(TEXT)), specials=[EOT])


@contextmanager
def serve(app) -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
