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

With --prefix, prefix caching instead (gptkit/inference/prefix_cache.py), one engine with the
cache and one without, side by side on the same weights and requests:
- time to first token of requests that share a 1,000-token prefix (each adds 4 tokens of its
  own and generates 20), median of 5 after one request that fills the cache;
- a 10-turn chat replay (a 200-token system prompt, then per turn 30 user tokens and a 20-token
  reply, each prompt the whole conversation so far, replies as token ids): tokens prefilled,
  prompt tokens, total wall time.

    python benchmarks/throughput.py [--device cpu|cuda] [--dtype float32] [--quantize int8]
                                    [--clients 1,16] [--new 128] [--tiny] [--prefix]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import statistics
import json
import time

import torch

from gptkit.config import SampleConfig, preset
from gptkit.inference.engine import Engine
from gptkit.inference.threads import serial_main_thread
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


def ttft(engine: Engine, prompt: list[int], new: int) -> tuple[float, float]:
    """(time to first token, total time) of one greedy request run alone."""
    start = time.perf_counter()
    events = iter(engine.submit(prompt, SampleConfig(max_tokens=new, temperature=0.0)))
    next(events)
    first = time.perf_counter() - start
    for _ in events:
        pass
    return first, time.perf_counter() - start


def prefix_figures(engine: Engine, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(0, vocab, (1000,), generator=gen).tolist()
    own = torch.randint(0, vocab, (6, 4), generator=gen).tolist()
    ttft(engine, shared + own[0], 20)  # fills the cache (and warms up either engine alike)
    shared_ttft = statistics.median(ttft(engine, shared + o, 20)[0] for o in own[1:])
    stats = engine.prefix_cache.stats if engine.prefix_cache else None
    hit0 = stats.hit_tokens if stats else 0
    history, prompt_tokens, wall = torch.randint(0, vocab, (200,), generator=gen).tolist(), 0, 0.0
    for _ in range(10):
        history += torch.randint(0, vocab, (30,), generator=gen).tolist()
        prompt_tokens += len(history)
        start = time.perf_counter()
        history += engine.generate(history, SampleConfig(max_tokens=20, temperature=0.0))[0].token_ids
        wall += time.perf_counter() - start
    reused = (stats.hit_tokens - hit0) if stats else 0
    return {"shared_prefix_ttft_s": shared_ttft, "replay_prompt_tokens": prompt_tokens,
            "replay_prefilled_tokens": prompt_tokens - reused, "replay_wall_s": wall}


def run_prefix(config, args) -> None:
    torch.manual_seed(0)
    model = GPT(config)
    kw = dict(max_batch=1, dtype=getattr(torch, args.dtype), quantize=args.quantize, device=args.device)
    engines = {"off": Engine(copy.deepcopy(model), **kw), "on": Engine(model, prefix_cache_bytes=256 * 2**20, **kw)}
    results = {}
    for name, engine in engines.items():
        engine.start()  # the scheduler thread, as in `gptkit serve`
        try:
            results[name] = prefix_figures(engine, config.vocab_size)
        finally:
            engine.shutdown()
    print("| prefix cache | TTFT, 1,000-token shared prefix (s) | 10-turn replay: prefilled / prompt tokens "
          "| replay wall (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['shared_prefix_ttft_s']:.3f} | {r['replay_prefilled_tokens']:,} / "
              f"{r['replay_prompt_tokens']:,} | {r['replay_wall_s']:.2f} |")
    off, on = results["off"], results["on"]
    out = {"device": args.device, "dtype": args.dtype, "quantize": args.quantize, "tiny": args.tiny,
           **{f"{name}_{k}": round(v, 4) for name, r in results.items() for k, v in r.items()},
           "ttft_speedup": round(off["shared_prefix_ttft_s"] / on["shared_prefix_ttft_s"], 1),
           "replay_speedup": round(off["replay_wall_s"] / on["replay_wall_s"], 2)}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default=None, choices=["int8"])
    ap.add_argument("--clients", default=None, help="comma-separated concurrency levels (default: by device)")
    ap.add_argument("--new", type=int, default=NEW, help="new tokens per request")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2 shape: checks the script, not the speed")
    ap.add_argument("--prefix", action="store_true", help="prefix caching: shared-prefix TTFT and a chat replay")
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
    if args.prefix:
        return run_prefix(config, args)
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
