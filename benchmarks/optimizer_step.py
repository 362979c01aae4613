"""What a training step costs with each optimizer, side by side, interleaved, at a given shape.

    python benchmarks/optimizer_step.py                       # the demo's shape (make demo)
    python benchmarks/optimizer_step.py --shape shakespeare   # the Shakespeare benchmark's

The same model, data and trainer settings (gptkit.training.optim.configure_optimizer, clip 1.0), one
optimizer changed; rounds alternate so a noisy machine slows both alike. Figures: ms per
whole step (forward, backward, clip, optimizer) and ms of the optimizer step alone, best
round. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.model.gpt import GPT
from gptkit.training.optim import configure_optimizer

SHAPES = {
    "demo": (ModelConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=6, n_embd=192, dropout=0.0), 32),
    "shakespeare": (ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                                bias=False), 12),
}


def setup(shape: str, optimizer: str):
    cfg, batch = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = configure_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-3), torch.device("cpu"))
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    return model, opt, x


def timed_steps(model, opt, x, steps: int) -> tuple[float, float]:
    """(ms per whole step, ms per optimizer step) over `steps` steps."""
    total = opt_time = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(x, targets=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        total += t2 - t0
        opt_time += t2 - t1
    return 1000 * total / steps, 1000 * opt_time / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per optimizer per round")
    args = ap.parse_args()
    runs = {name: setup(args.shape, name) for name in ("adamw", "muon")}
    for model, opt, x in runs.values():  # warm-up
        timed_steps(model, opt, x, 2)
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(args.rounds):
        for name, (model, opt, x) in runs.items():
            step_ms, opt_ms = timed_steps(model, opt, x, args.steps)
            best[name] = (min(best[name][0], step_ms), min(best[name][1], opt_ms))
    print(f"shape {args.shape}, {torch.get_num_threads()} threads; best of {args.rounds} rounds x {args.steps} steps")
    print("| optimizer | ms per step | ms in the optimizer step |\n|---|---|---|")
    for name, (step_ms, opt_ms) in best.items():
        print(f"| {name} | {step_ms:.1f} | {opt_ms:.1f} |")
    ratio = best["muon"][0] / best["adamw"][0]
    print(f"muon / adamw per step: {ratio:.2f}")
    print(json.dumps({"shape": args.shape, "threads": torch.get_num_threads(),
                      **{f"{n}_step_ms": round(v[0], 2) for n, v in best.items()},
                      **{f"{n}_optimizer_ms": round(v[1], 2) for n, v in best.items()},
                      "muon_over_adamw": round(ratio, 3)}))


if __name__ == "__main__":
    main()
