"""`make demo`: the whole pipeline on a corpus every Python install has, in about 5 minutes.

tokenizer (byte-level BPE) -> prepare (token shards) -> pretrain (a small GPT) -> samples.
The corpus is the standard library's documentation topics and its source code, so nothing
is downloaded. Each stage is the same function the CLI commands call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from gptkit.config import ModelConfig, SampleConfig, TrainConfig
from gptkit.data.prepare import prepare
from gptkit.data.shards import TokenShards
from gptkit.data.sources import stdlib_documents
from gptkit.device import device_name, resolve_device
from gptkit.inference.factory import build_engine
from gptkit.model.gpt import GPT
from gptkit.text.stream import completion_text
from gptkit.text.tokenizer import BPETokenizer
from gptkit.training.distributed import Dist
from gptkit.training.loop import evaluate, lm_loss, train


@dataclasses.dataclass
class DemoConfig:
    out: str = "runs/demo"
    vocab_size: int = 4096
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(
        vocab_size=4096, block_size=128, n_layer=4, n_head=6, n_embd=192, dropout=0.0))
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = TrainConfig.optimizer
    seed: int = 1337
    prompts: tuple[str, ...] = ("def read_config(path):\n", "The standard library")
    device: str = "auto"  # auto: a CUDA GPU when there is one, at GPU_SIZE; else the CPU at the sizes above


# What the demo becomes on a GPU: ~6x the parameters (15.9M), 4x the steps of 4x the tokens, in bf16
# (chosen for a few minutes on one data-centre GPU; not yet timed on one).
GPU_SIZE = dict(model=ModelConfig(vocab_size=4096, block_size=256, n_layer=8, n_head=8, n_embd=384, dropout=0.0),
                steps=2000, batch_size=64)


def demo_device(cfg: DemoConfig) -> tuple[DemoConfig, torch.device]:
    """The device the demo runs on (gptkit.device), and the config for it: bigger when auto finds a
    GPU (unless steps were set)."""
    device = resolve_device(cfg.device)
    if cfg.device == "auto" and device.type == "cuda":
        cfg = dataclasses.replace(cfg, **GPU_SIZE)
    return dataclasses.replace(cfg, device=device.type), device


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict:
    cfg, device = demo_device(cfg)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    say("1/4 tokenizer: training byte-level BPE on the standard library's docs and source ...")
    tokenizer = BPETokenizer.train((text for _, text in stdlib_documents()), vocab_size=cfg.vocab_size)
    tokenizer.save(out / "tokenizer")
    say(f"    vocab {tokenizer.vocab_size} ({time.perf_counter() - t0:.0f}s)")

    say("2/4 prepare: tokenizing the corpus into shards ...")
    meta = prepare(["stdlib"], out / "tokenizer", out / "data", workers=2, val_fraction=0.01)
    say(f"    train {meta['splits']['train']['tokens']:,} tokens, val {meta['splits']['val']['tokens']:,} tokens "
        f"from {len(meta['sources'])} sources ({meta['seconds']:.0f}s)")

    torch.manual_seed(cfg.seed)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    model = GPT(model_cfg).to(device)
    data = TokenShards.from_dir(out / "data", model_cfg.block_size, cfg.batch_size, seed=cfg.seed, eval_batches=20)
    before = evaluate(model, data, lm_loss, contextlib.nullcontext(), _single(), data.bytes_per_token())
    train_cfg = TrainConfig(out_dir=str(out / "model"), max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                            warmup_steps=min(100, cfg.steps // 10), eval_interval=cfg.steps // 4,
                            eval_batches=20, seed=cfg.seed, weight_decay=0.1, beta2=0.99,
                            optimizer=cfg.optimizer)
    say(f"3/4 pretrain on {device_name(device)}: {model.num_params() / 1e6:.1f}M-parameter GPT, {cfg.steps} steps "
        f"of {cfg.batch_size}x{model_cfg.block_size} tokens, {train_cfg.optimizer}; val loss before training "
        f"{before['val_loss']:.3f}")
    after = train(model, data, train_cfg, tokenizer, log=say)
    say(f"    val loss {before['val_loss']:.3f} -> {after['val_loss']:.3f} "
        f"(perplexity {before['val_ppl']:.0f} -> {after['val_ppl']:.1f}, bits/byte {after.get('val_bpb', 0):.2f})")

    say("4/4 samples (temperature 0.7, top-k 40):")
    engine = build_engine(model.eval(), tokenizer, max_batch=2, device=str(next(model.parameters()).device))
    samples = []
    for prompt in cfg.prompts:
        ids = tokenizer.encode(prompt)
        params = SampleConfig(max_tokens=min(120, model_cfg.block_size - len(ids)), temperature=0.7, top_k=40,
                              seed=cfg.seed)
        text = prompt + completion_text(tokenizer, engine.generate(ids, params)[0])
        samples.append(text)
        say("-" * 60 + "\n" + text)
    say("-" * 60)
    ckpt = out / "model"
    say(f"done in {(time.perf_counter() - t0) / 60:.1f} min. Checkpoint: {ckpt}\nnext:\n"
        f"  .venv/bin/gptkit generate {ckpt} -p 'import os' --max-tokens 100\n"
        f"  .venv/bin/gptkit serve {ckpt}            # OpenAI-compatible API on 127.0.0.1:8000\n"
        f"  .venv/bin/gptkit recipe docs             # chat-tune it on stdlib docstrings\n"
        f"  .venv/bin/gptkit export-hf {ckpt} runs/demo/hf   # load it with transformers")
    return {"device": device_name(device), "val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
            "samples": samples, "checkpoint": str(ckpt), "minutes": (time.perf_counter() - t0) / 60}


def _single():
    return Dist()
