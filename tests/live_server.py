"""A real server for tests: a tiny model served by uvicorn on 127.0.0.1 (a free port) in a
thread of the test process, so tests can look at its engine while they talk HTTP to it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import torch

from gptkit.config import ModelConfig
from gptkit.inference.engine import Engine
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import EOT, BPETokenizer, CharTokenizer, Tokenizer

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


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


@contextmanager
def serve(app) -> Iterator[str]:
    """An app on uvicorn in a thread of this process, on a free port; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serve_cli(args: list[str], log_path: Path, env: dict | None = None) -> Iterator[str]:
    """`gptkit serve ARGS` in a subprocess on a free port, its output in log_path; yields its URL
    once healthy."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", *args, "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
