"""The server's memory after large requests: resident size (RSS) of `gptkit serve` at start, right
after each of three requests with a 3.8 MB chat body (refused as over the context once tokenized:
the cost is the body and its token list), and after two idle seconds.

The server hands freed memory back to the system after a body over 1 MiB (gc + glibc's
malloc_trim, gptkit.server.limits.release_memory); `--no-trim` serves with that switched off,
for the comparison.

    python benchmarks/server_memory.py [--no-trim]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptkit.checkpoint.format import save_checkpoint
from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import EOT, CharTokenizer

PORT = 18777


def rss_mb(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-trim", action="store_true", help="serve without handing memory back (the comparison)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = CharTokenizer(sorted(set("hello world abc")), [EOT])
        torch.manual_seed(0)
        save_checkpoint(Path(tmp) / "m", GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2,
                                                          n_head=2, n_embd=64)), tok)
        env = {**os.environ, **({"GPTKIT_NO_TRIM": "1"} if args.no_trim else {})}
        server = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", str(Path(tmp) / "m"), "--name", "m",
                                   "--port", str(PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            for _ in range(240):
                try:
                    httpx.get(f"http://127.0.0.1:{PORT}/health")
                    break
                except httpx.HTTPError:
                    time.sleep(0.5)
            rows = {"start": rss_mb(server.pid)}
            body = {"model": "m", "messages": [{"role": "user", "content": "hello world abc " * 240000}]}
            for i in range(3):
                r = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=120)
                rows[f"after request {i + 1} ({r.status_code})"] = rss_mb(server.pid)
            time.sleep(2)
            rows["after 2 s idle"] = rss_mb(server.pid)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    for k, v in rows.items():
        print(f"{k:<28} {v:>6} MB")
    print(json.dumps({"trim": not args.no_trim, "rss_mb": rows}))


if __name__ == "__main__":
    main()
