"""Aggregate decoding throughput and latency of the continuous-batching scheduler under
concurrent streams, consumed as the server consumes them.

For each concurrency level N, N streams each submit one request (a 32-token prompt, 128 new
tokens, greedy) at the same moment to an engine whose scheduler thread is running, and read
its events with `handle.aiter()` in one asyncio event loop: the path the server's handlers
take (what is left out is HTTP and SSE encoding). Figures per level:

- aggregate tokens/s: all new tokens / wall time from the submissions to the last token;
- time to first token (TTFT), p50 and p99 over the streams;
- inter-token latency (ITL), p50 and p99 over every gap between two tokens of one stream.

Randomly initialised GPT-2 124M. Levels are 1, 4, 16 on CPU and 1, 16, 64, 256 on CUDA
(`--clients` picks others). The last line of output is one JSON object with every figure.

    python benchmarks/throughput.py [--device cpu|cuda] [--dtype float32] [--quantize int8]
                                    [--clients 1,16] [--new 128] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time

import torch

from gptkit.config import SampleConfig, preset
from gptkit.inference.engine import Engine, serial_main_thread
from gptkit.model.gpt import GPT

PROMPT, NEW = 32, 128
CLIENTS = {"cpu": (1, 4, 16), "cuda": (1, 16, 64, 256)}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the nearest ranks."""
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


async def run_streams(engine: Engine, n_streams: int, new: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(n_streams)
    prompts = torch.randint(0, vocab, (n_streams, PROMPT), generator=gen).tolist()
    params = SampleConfig(max_tokens=new, temperature=0.0)
    ttft: list[float] = []
    gaps: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()

    async def stream(prompt: list[int]) -> None:
        n, last = 0, start
        async for event in engine.submit(prompt, params).aiter():
            if event.token_id is not None:
                now = time.perf_counter()
                (ttft if n == 0 else gaps).append(now - last)
                n, last = n + 1, now
        counts.append(n)

    await asyncio.gather(*(stream(p) for p in prompts))
    wall = time.perf_counter() - start
    assert counts == [new] * n_streams, counts  # every request ran to max_tokens
    return {"tok_s": sum(counts) / wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default=None, choices=["int8"])
    ap.add_argument("--clients", default=None, help="comma-separated concurrency levels (default: by device)")
    ap.add_argument("--new", type=int, default=NEW, help="new tokens per request")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2 shape: checks the script, not the speed")
    ap.add_argument("--main-thread-team", action="store_true",
                    help="let the main thread keep its OpenMP team (what serving did before serial_main_thread)")
    args = ap.parse_args()
    levels = tuple(int(c) for c in args.clients.split(",")) if args.clients else CLIENTS[args.device]
    threads = torch.get_num_threads()
    if not args.main_thread_team:
        serial_main_thread()  # as `gptkit serve` does
    torch.manual_seed(0)
    config = preset("gpt2")
    if args.tiny:
        config = dataclasses.replace(config, n_layer=2, n_head=2, n_embd=64)
    engine = Engine(GPT(config), max_batch=max(levels), dtype=getattr(torch, args.dtype), quantize=args.quantize,
                    device=args.device)
    engine.start()
    try:
        asyncio.run(run_streams(engine, 1, args.new, config.vocab_size))  # warm-up (and graph capture for 1 row)
        results = {n: asyncio.run(run_streams(engine, n, args.new, config.vocab_size)) for n in levels}
    finally:
        engine.shutdown()
    print("| streams | aggregate tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | wall s |")
    print("|---------|-----------------|------------|------------|------------|------------|--------|")
    for n, r in results.items():
        print(f"| {n:7d} | {r['tok_s']:15.1f} | {r['ttft_p50_s']:10.3f} | {r['ttft_p99_s']:10.3f} "
              f"| {r['itl_p50_ms']:10.1f} | {r['itl_p99_ms']:10.1f} | {r['wall_s']:6.1f} |")
    out = {"device": args.device, "dtype": args.dtype, "quantize": args.quantize, "threads": threads,
           "main_thread_team": args.main_thread_team, "static_decode": engine._static is not None, "tiny": args.tiny}
    for n, r in results.items():
        out.update({f"c{n}_{k}": round(v, 4 if k.endswith("_s") else 1) for k, v in r.items()})
    top = max(levels)
    out[f"speedup_{top}_vs_1"] = round(results[top]["tok_s"] / results[1]["tok_s"], 2) if 1 in results else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
