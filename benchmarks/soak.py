"""Soak and overload of a real `gptkit serve` on 127.0.0.1, driven over HTTP like real clients.

1. soak:       --clients streaming clients, each sending one streamed completion after another
               for --minutes: 5xx responses, truncated streams (no `[DONE]`, or an error event),
               time to first token p50/p99, and the server's RSS growth from after a warm-up
               round to the end (VmRSS of the server process).
2. overload:   a burst of --burst-factor x capacity (capacity = max_batch + max_queue) streamed
               requests at once: how many get 429 and whether each carries Retry-After; then,
               while the queue is full, 20 requests one at a time: the time from sending each
               to its 429 status line (the burst's own 429 times include the client's queueing
               on a CPU the server shares, so they are reported apart).
3. disconnect: --disconnects clients start a stream, read the first chunk and hang up; how long
               until /health shows 0 running and 0 queued.

The last line of output is one JSON object with every figure.

    python benchmarks/soak.py --ckpt runs/demo/model --clients 32 --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = "def read_file(path):\n    "
KEY = "soak-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


class Client:
    def __init__(self, url: str, max_tokens: int):
        self.url, self.max_tokens = url, max_tokens
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(300), headers={"Authorization": f"Bearer {KEY}"},
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    def body(self) -> dict:
        return {"model": "soak", "prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0.8, "stream": True}

    async def stream(self, stats: dict) -> None:
        """One streamed completion; counts its outcome into stats."""
        start = time.perf_counter()
        async with self.http.stream("POST", f"{self.url}/v1/completions", json=self.body()) as r:
            if r.status_code >= 500:
                stats["5xx"] += 1
                return
            if r.status_code != 200:
                stats["other_status"][r.status_code] = stats["other_status"].get(r.status_code, 0) + 1
                return
            first, done, error = None, False, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if '"error"' in line[:20]:
                        error = True
                    elif first is None:
                        first = time.perf_counter() - start
            stats["ttft"].append(first) if first is not None else None
            stats["completed"] += done and not error
            stats["truncated"] += not done or error

    async def health(self) -> dict:
        return (await self.http.get(f"{self.url}/health")).json()


async def soak(c: Client, clients: int, seconds: float) -> dict:
    stats = {"completed": 0, "truncated": 0, "5xx": 0, "errors": 0, "other_status": {}, "ttft": []}
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            try:
                await c.stream(stats)
            except httpx.HTTPError:
                stats["errors"] += 1

    await asyncio.gather(*(loop() for _ in range(clients)))
    ttft = stats.pop("ttft")
    return {**stats, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "ttft_mean_s": statistics.mean(ttft) if ttft else None}


async def overload(c: Client, n: int, max_queue: int, probes: int = 20) -> dict:
    """n streamed requests at once (the burst's 429s timed from their coroutine's start, which
    on a loaded machine includes the client's own queueing); then, with the queue full,
    `probes` more requests one at a time, each timed from send to status line."""
    results: list[tuple[int, float, bool]] = []

    async def one(into: list) -> None:
        start = time.perf_counter()
        async with c.http.stream("POST", f"{c.url}/v1/completions", json=c.body()) as r:
            into.append((r.status_code, time.perf_counter() - start, "retry-after" in r.headers))
            if r.status_code == 200:
                async for _ in r.aiter_bytes():
                    pass

    burst = asyncio.gather(*(one(results) for _ in range(n)))
    probed: list[tuple[int, float, bool]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum(m["queued"] for m in (await c.health())["models"].values()) >= max_queue:
            for _ in range(probes):
                await one(probed)
            break
        await asyncio.sleep(0.01)
    await burst

    def summary(rs: list[tuple[int, float, bool]]) -> dict:
        rejected = [(lat, ra) for status, lat, ra in rs if status == 429]
        ms = [lat * 1000 for lat, _ in rejected]
        return {"requests": len(rs), "ok": sum(s == 200 for s, _, _ in rs), "429": len(rejected),
                "other": sum(s not in (200, 429) for s, _, _ in rs),
                "429_with_retry_after": sum(ra for _, ra in rejected),
                "429_latency_p50_ms": round(percentile(ms, 0.5), 1) if ms else None,
                "429_latency_max_ms": round(max(ms), 1) if ms else None}

    return {"burst": summary(results), "probes_while_full": summary(probed)}


async def disconnects(c: Client, n: int) -> dict:
    """n clients hang up after their first chunk; the time until the server runs nothing."""
    context = (await c.http.get(f"{c.url}/v1/models")).json()["data"][0]["max_model_len"]

    async def one() -> None:  # as long a completion as the context allows, so none ends by itself
        async with c.http.stream("POST", f"{c.url}/v1/completions", json={**c.body(), "max_tokens": context - 16}) as r:
            async for _ in r.aiter_lines():
                break  # hang up mid-stream

    await asyncio.gather(*(one() for _ in range(n)))
    left = time.perf_counter()
    while True:
        load = [m for m in (await c.health())["models"].values()]
        if all(m["running"] == 0 and m["queued"] == 0 for m in load):
            return {"clients": n, "seconds_to_zero_running": round(time.perf_counter() - left, 3)}
        if time.perf_counter() - left > 30:
            return {"clients": n, "seconds_to_zero_running": None, "still": load}
        await asyncio.sleep(0.01)


async def run(args, url: str, pid: int) -> dict:
    c = Client(url, args.max_tokens)
    await soak(c, args.clients, 5)  # warm-up: allocations and caches settle before the RSS baseline
    rss0 = rss_mb(pid)
    soaked = await soak(c, args.clients, args.minutes * 60)
    rss1 = rss_mb(pid)
    capacity = args.max_batch + args.max_queue
    over = await overload(c, args.burst_factor * capacity, args.max_queue)
    gone = await disconnects(c, args.disconnects)
    await c.http.aclose()
    return {"clients": args.clients, "minutes": args.minutes, "max_tokens": args.max_tokens,
            "max_batch": args.max_batch, "max_queue": args.max_queue, "soak": soaked,
            "rss_mb_start": round(rss0, 1), "rss_mb_end": round(rss1, 1),
            "rss_growth_pct": round((rss1 - rss0) / rss0 * 100, 2), "overload": over, "disconnect": gone}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="runs/demo/model", help="checkpoint to serve")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per streamed completion")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--burst-factor", type=int, default=4, help="overload burst, in multiples of capacity")
    p.add_argument("--disconnects", type=int, default=100)
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.devnull, "w")
    proc = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", args.ckpt, "--name", "soak", "--port", str(port),
                             "--api-key", KEY, "--max-batch", str(args.max_batch),
                             "--max-queue", str(args.max_queue)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start (exit {proc.poll()})")
            time.sleep(0.3)
        result = asyncio.run(run(args, url, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
