"""Character-level Tiny Shakespeare with nanoGPT's "baby GPT" settings, through gptkit's trainer.

    python benchmarks/train_shakespeare_char.py ../shared/data/tinyshakespeare.txt

First 90% of characters train, last 10% validate; n_layer=4, n_head=4, n_embd=128,
block_size=64, batch_size=12, AdamW lr 1e-3 (beta2 0.99), 100 warmup iterations, cosine to
1e-4 over 2000 iterations, dropout 0, no biases (as the reference); validation loss on 20 batches at the end.
The last line of output is one JSON object: {"val_loss", "wall_s", "tokens_per_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.data.shards import TokenShards
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import CharTokenizer
from gptkit.training.loop import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="tinyshakespeare.txt")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    text = open(args.path, encoding="utf-8").read()
    tok = CharTokenizer.train([text])
    # The tokenizer puts its 3 special and 256 byte-fallback ids before the characters; every
    # character of this text is in the vocabulary, so shift them down to a dense vocabulary of
    # the 65 characters, as the reference does (a 324-wide head would be 5% more matmul work).
    ids = np.array(tok.encode(text), dtype=np.int64) - (tok.vocab_size - len(tok.chars))
    vocab = len(tok.chars)
    ids = ids.astype(np.uint16)
    n = int(0.9 * len(ids))
    data = TokenShards([ids[:n]], [ids[n:]], block_size=64, batch_size=12, seed=args.seed, eval_batches=20)
    model = GPT(ModelConfig(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                    bias=False))  # the reference's setting (nanoGPT's train.py: bias = False)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=args.iters, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                          beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=args.iters, eval_batches=20,
                          log_interval=100, seed=args.seed, dtype=args.dtype, compile=args.compile, progress=False)
        last = train(model, data, cfg, None, log=lambda m: None)  # ids are not the tokenizer's
    wall = time.perf_counter() - t_start
    full = whole_val_loss(model, ids[n:], 64)  # after the timing: context for the 20-batch figure
    result = {"val_loss": round(last["val_loss"], 4), "wall_s": round(wall, 1),
              "tokens_per_s": round(args.iters * 12 * 64 / last["elapsed_s"], 1),
              "train_s": last["elapsed_s"],
              "val_loss_all_windows": round(full, 4), "seed": args.seed, "vocab": vocab, "threads": torch.get_num_threads(), "dtype": args.dtype,
              "torch": torch.__version__}
    print(json.dumps(result))


@torch.no_grad()
def whole_val_loss(model: GPT, val: np.ndarray, block: int) -> float:
    """Mean loss over every non-overlapping block of the validation split."""
    x = torch.from_numpy(val.astype(np.int64))
    n = (len(x) - 1) // block
    xs, ys = x[: n * block].view(n, block), x[1 : n * block + 1].view(n, block)
    model.eval()
    return sum(model(xs[i:i + 256], targets=ys[i:i + 256]).item() * len(xs[i:i + 256])
               for i in range(0, n, 256)) / n


if __name__ == "__main__":
    main()
