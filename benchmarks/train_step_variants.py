"""Where the time of a small training step goes: model variants timed side by side, interleaved.

    python benchmarks/train_step_variants.py

The Shakespeare benchmark's shape (4 layers, 4 heads, n_embd 128, 12 x 64 tokens) with one
option changed at a time. Rounds alternate between the variants so that a noisy machine slows
all of them alike; the figures are ms per optimizer step (forward, backward, clip, AdamW) and
the ratio to the baseline. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT

BASE = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
VARIANTS = {
    "baseline (exact GELU, no bias, vocab 65, fp32)": {},
    "tanh GELU": {"activation": "gelu_tanh"},
    "biases": {"bias": True},
    "vocab 324 (char tokenizer ids)": {"vocab_size": 324},
    "bf16 autocast": {"amp": True},
    "1 thread": {"threads": 1},
}


def make(options: dict):
    options = dict(options)
    amp, threads = options.pop("amp", False), options.pop("threads", None)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**BASE, **options}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    return model, opt, ctx, threads


def step(model, opt, ctx, data: torch.Tensor) -> None:
    ix = torch.randint(len(data) - 65, (12,))
    x = torch.stack([data[i:i + 64] for i in ix])
    y = torch.stack([data[i + 1:i + 65] for i in ix])
    with ctx():
        loss = model(x, targets=y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=25, help="timed steps per variant per round")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    data = torch.randint(0, 65, (100_000,))
    runs = {name: make(opts) for name, opts in VARIANTS.items()}
    total = dict.fromkeys(runs, 0.0)
    for _ in range(args.rounds):
        for name, (model, opt, ctx, threads) in runs.items():
            torch.set_num_threads(threads or default_threads)
            for _ in range(3):  # warm up after the switch
                step(model, opt, ctx, data)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, ctx, data)
            total[name] += time.perf_counter() - t
    ms = {name: 1e3 * t / (args.rounds * args.steps) for name, t in total.items()}
    base = next(iter(ms.values()))
    for name, v in ms.items():
        print(f"{name:48s} {v:6.1f} ms/step  x{v / base:.2f}")
    print(json.dumps({"ms_per_step": {k: round(v, 2) for k, v in ms.items()}, "threads": default_threads,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
