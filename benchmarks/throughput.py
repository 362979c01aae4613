"""Aggregate decoding throughput of the continuous-batching scheduler under concurrent clients.

1, 4 and 16 client threads each submit one request (a 32-token prompt, 128 new tokens,
greedy) at the same moment to an engine whose scheduler thread is running, and stream its
events. Aggregate tokens/s = all new tokens / wall time from the submissions to the last
token; time to first token is averaged over the clients. Randomly initialised GPT-2 124M.
The last line of output is one JSON object with every figure.

    python benchmarks/throughput.py [--dtype float32] [--quantize int8]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from gptkit.config import SampleConfig, preset
from gptkit.engine import Engine, serial_main_thread
from gptkit.model import GPT

PROMPT, NEW, CLIENTS = 32, 128, (1, 4, 16)


def run_clients(engine: Engine, n_clients: int) -> dict:
    prompts = torch.randint(0, 50257, (n_clients, PROMPT), generator=torch.Generator().manual_seed(n_clients)).tolist()
    first_token: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()

    def client(prompt: list[int]) -> None:
        n = 0
        for event in engine.submit(prompt, SampleConfig(max_tokens=NEW, temperature=0.0)):
            if event.token_id is not None:
                if n == 0:
                    first_token.append(time.perf_counter() - start)
                n += 1
        counts.append(n)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert counts == [NEW] * n_clients, counts  # every request ran to max_tokens
    return {"tok_s": sum(counts) / wall, "ttft_s": sum(first_token) / n_clients, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default=None, choices=["int8"])
    ap.add_argument("--main-thread-team", action="store_true",
                    help="let the main thread keep its OpenMP team (what serving did before serial_main_thread)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    if not args.main_thread_team:
        serial_main_thread()  # as `gptkit serve` does
    torch.manual_seed(0)
    engine = Engine(GPT(preset("gpt2")), max_batch=max(CLIENTS), dtype=getattr(torch, args.dtype),
                    quantize=args.quantize)
    engine.start()
    try:
        run_clients(engine, 1)  # warm-up
        results = {n: run_clients(engine, n) for n in CLIENTS}
    finally:
        engine.shutdown()
    print(f"| concurrent requests | aggregate tok/s | mean time to first token s | wall s |")
    print(f"|---------------------|-----------------|----------------------------|--------|")
    for n, r in results.items():
        print(f"| {n:19d} | {r['tok_s']:15.1f} | {r['ttft_s']:26.2f} | {r['wall_s']:6.1f} |")
    out = {"dtype": args.dtype, "quantize": args.quantize, "threads": threads,
           "main_thread_team": args.main_thread_team}
    for n, r in results.items():
        out.update({f"c{n}_tok_s": round(r["tok_s"], 1), f"c{n}_ttft_s": round(r["ttft_s"], 3)})
    out["speedup_16_vs_1"] = round(results[16]["tok_s"] / results[1]["tok_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
