"""Tiny Shakespeare (characters, nanoGPT's CPU baseline model) through gptkit's trainer with
one set of optimizer options; prints the validation loss on the whole split.

    python benchmarks/shakespeare_options.py --optimizer muon --lr 2e-3 --iters 1000

Measures learning per step, not speed: one torch thread, so runs side by side on a busy
machine give the same losses as on a quiet one (their seconds do not compare).
Model: 4 layers, 4 heads, 128 wide, 64 characters of context, no biases, dropout 0; data:
the first 90 % of characters train, the rest validate; warmup then cosine to lr/10.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_shakespeare_char import whole_val_loss  # noqa: E402

from gptkit.config import ModelConfig, TrainConfig  # noqa: E402
from gptkit.data.shards import TokenShards  # noqa: E402
from gptkit.model.gpt import GPT  # noqa: E402
from gptkit.training.loop import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    data = TokenShards([ids[:n]], [ids[n:]], block_size=64, batch_size=args.batch_size, seed=args.seed,
                       eval_batches=20)
    torch.manual_seed(args.seed)
    model = GPT(ModelConfig(vocab_size=len(chars), block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=args.iters, batch_size=args.batch_size, lr=args.lr,
                          min_lr=args.lr / 10, warmup_steps=args.warmup, beta2=0.99, weight_decay=0.1,
                          eval_interval=0, log_interval=100, seed=args.seed, dtype="float32", progress=False,
                          optimizer=args.optimizer)
        t = time.perf_counter()
        last = train(model, data, cfg, None, log=lambda m: None)
        seconds = time.perf_counter() - t
    print(json.dumps({**vars(args), "val_loss_whole_split": round(whole_val_loss(model, ids[n:], 64), 4),
                      "train_loss": round(last["loss"], 4), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
