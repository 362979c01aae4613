"""gptkit's DPO against TRL's DPOTrainer, side by side in one run, on the same model and pairs.

One small GPT-2-family model with a byte-level BPE tokenizer is built here (random weights,
seeded), saved as a gptkit checkpoint and exported with `gptkit export-hf`; TRL trains the
export, gptkit the checkpoint. Both see the same pairs in the same order (batches taken in
sequence, no shuffling: TRL's sampler is replaced by a sequential one), with the same
hyper-parameters: sigmoid loss, beta, constant learning rate, AdamW (betas, eps 1e-8, no weight
decay), gradient clipping at 1.0, no dropout, fp32 on the CPU. TRL keeps a reference copy of
the model and scores it in every step; gptkit scores the reference once before training.

Prompts end with a newline, so TRL's tokenisation of prompt + answer as one string gives the
same ids as gptkit's prompt and answer encoded apart (checked before training). Reported per
step: both losses and their difference (target: within 1e-3 for the first 20 steps), and the
wall time of each trainer: from loading the model to its saved result, imports done beforehand.

    python benchmarks/dpo_vs_trl.py [--steps 20] [--pairs 160] [--batch-size 8] [--beta 0.1] [--lr 5e-4]
                                    [--sft-weight 0 1]

Each --sft-weight is one side-by-side run: 0 is plain DPO, w > 0 adds w x the chosen answers'
NLL per token (gptkit's --sft-weight; TRL's loss_type ["sigmoid", "sft"], loss_weights [1, w]).

Needs the bench extra (transformers and TRL, pinned): `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from gptkit.checkpoint.format import save_checkpoint
from gptkit.checkpoint.hf import export_hf
from gptkit.checkpoint.open import open_checkpoint
from gptkit.config import ModelConfig, TrainConfig
from gptkit.data.pairs import pair_examples
from gptkit.data.records import TaskBatches, read_records
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import BPETokenizer
from gptkit.training.loop import train
from gptkit.training.preference import DPOLoss, fill_reference

WORDS = ["river", "stone", "light", "garden", "window", "quiet", "north", "paper", "silver", "music", "cloud",
         "bread", "train", "summer", "letter", "market", "猫", "山", "水", "书"]


def make_pairs(n: int, seed: int) -> list[dict]:
    """Prompts of a few words ending in a newline; the chosen answer repeats them in order, the rejected
    one shuffles and drops some (answers of different lengths, as real pairs have)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 6))
        wrong = rng.sample(words, max(1, len(words) - rng.randint(0, 2)))
        if wrong == words:
            wrong = wrong[::-1] + ["again"]
        pairs.append({"prompt": "Repeat: " + " ".join(words) + "\n", "chosen": " ".join(words),
                      "rejected": " ".join(wrong)})
    return pairs


def build_model(folder: Path, pairs: list[dict], seed: int) -> Path:
    texts = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    tokenizer = BPETokenizer.train(texts * 4, 400)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                            activation="gelu_tanh"))
    save_checkpoint(folder / "gptkit", model, tokenizer)
    export_hf(folder / "gptkit", folder / "hf")
    return folder / "gptkit"


class InOrder:
    """The trainer's batch source: pairs in file order, batch after batch (as TRL's sequential sampler)."""

    def __init__(self, batches: TaskBatches):
        self.batches, self.next = batches, 0

    def train_batch(self) -> tuple:
        n = self.batches.batch_size
        chunk = [self.batches.train[(self.next + i) % len(self.batches.train)] for i in range(n)]
        self.next += n
        return self.batches.collate(chunk)

    def val_sets(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"next": self.next}


def run_gptkit(ckpt: Path, data: Path, args, out: Path) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    loaded = open_checkpoint(ckpt)
    fmt, records, _ = read_records(data)
    pairs, _ = pair_examples(fmt, records, loaded.tokenizer, loaded.model.config.block_size)
    batches = TaskBatches("preference", pairs, [], args.batch_size, loaded.tokenizer.eot_id)
    fill_reference(loaded.model, batches, torch.autocast("cpu", enabled=False))
    cfg = TrainConfig(out_dir=str(out), max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr,
                      warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0, optimizer="adamw",
                      eval_interval=0, log_interval=1, progress=False, dtype="float32", seed=args.seed)
    losses: list[float] = []
    train(loaded.model, InOrder(batches), cfg, loaded.tokenizer, loss_fn=DPOLoss(args.beta, args.sft_weight),
          log=lambda m: None,
          on_step=lambda step, m: losses.append(m["loss"]))
    return losses, time.perf_counter() - t0


def run_trl(hf: Path, pairs: list[dict], args, out: Path) -> tuple[list[float], float]:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    losses: list[float] = []

    class Recorded(DPOTrainer):
        def _get_train_sampler(self, *a, **k):  # the same batches as gptkit's: the pairs in order
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)
            if self.model.training:
                losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
            return loss

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=args.beta,
                       loss_type=["sigmoid", "sft"] if args.sft_weight else ["sigmoid"],
                       loss_weights=[1.0, args.sft_weight] if args.sft_weight else None, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                       seed=args.seed, dataloader_num_workers=0, max_length=None, disable_dropout=True)
    trainer = Recorded(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out / "final"))  # gptkit's run ends with a checkpoint too
    return losses, time.perf_counter() - t0


def check_same_ids(ckpt: Path, hf: Path, pairs: list[dict]) -> None:
    """gptkit's prompt and answer encoded apart + <|endoftext|> == TRL's tokenisation of the joined string."""
    from transformers import AutoTokenizer

    ours, theirs = open_checkpoint(ckpt).tokenizer, AutoTokenizer.from_pretrained(hf)
    for p in pairs:
        for side in ("chosen", "rejected"):
            a = ours.encode(p["prompt"]) + ours.encode(p[side]) + [ours.eot_id]
            b = theirs(p["prompt"] + p[side] + theirs.eos_token, add_special_tokens=False)["input_ids"]
            if a != b:
                raise SystemExit(f"token ids differ for {p['prompt']!r} + {p[side]!r}: {a} vs {b}")


def compare(args, root: Path, pairs: list[dict], data: Path, ckpt: Path, quiet: bool = False) -> dict:
    name = f"{args.sft_weight}-{args.steps}"
    ours, our_s = run_gptkit(ckpt, data, args, root / f"gptkit-{name}")
    theirs, their_s = run_trl(root / "hf", pairs, args, root / f"trl-{name}")
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    if quiet:
        return {}
    loss = "sigmoid" + (f" + {args.sft_weight} x sft (RPO)" if args.sft_weight else "")
    print(f"\nloss {loss}\n{'step':>4} {'gptkit':>10} {'TRL':>10} {'|diff|':>10}")
    for i, (a, b) in enumerate(zip(ours, theirs), 1):
        print(f"{i:>4} {a:>10.6f} {b:>10.6f} {abs(a - b):>10.2e}")
    return {"loss": loss, "steps": len(diffs), "max_abs_diff": max(diffs), "within_1e-3": all(d < 1e-3 for d in diffs),
            "gptkit_s": round(our_s, 2), "trl_s": round(their_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-weight", type=float, nargs="+", default=[0.0, 1.0],
                   help="runs per weight of the chosen answers' NLL term (0: plain DPO; TRL: loss_type sft)")
    args = p.parse_args()
    # one-off imports first, so that neither side's time includes them
    import matplotlib.pyplot  # noqa: F401  (gptkit's loss plot)
    import torch._dynamo  # noqa: F401  (the first optimizer imports it)
    import trl  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = make_pairs(args.pairs, args.seed)
        data = root / "pairs.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8")
        ckpt = build_model(root, pairs, args.seed)
        check_same_ids(ckpt, root / "hf", pairs)
        # an untimed warm-up of both trainers (first forward passes, allocator, lazy imports), then the runs
        compare(argparse.Namespace(**{**vars(args), "steps": 2, "sft_weight": 0.0}), root, pairs, data, ckpt, quiet=True)
        runs = [compare(argparse.Namespace(**{**vars(args), "sft_weight": w}), root, pairs, data, ckpt)
                for w in args.sft_weight]
    print(json.dumps({"runs": runs, "pairs": args.pairs, "batch_size": args.batch_size, "beta": args.beta,
                      "lr": args.lr, "torch_threads": torch.get_num_threads(), "cpu": _cpu()}))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
