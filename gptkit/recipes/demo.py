"""`make demo`: the whole pipeline on a corpus every Python install has, in about 5 minutes.

tokenizer (byte-level BPE) -> prepare (token shards) -> pretrain (a small GPT) -> a quiz -> samples.
The corpus is the standard library's documentation topics and its source code, so nothing
is downloaded. Each stage is the same function the CLI commands call.

Pretraining runs by time: a few steps of a copy of the model are timed first, and the run gets
as many steps as the rest of the budget (`minutes`, the whole demo) allows, so its learning-rate
schedule warms up and decays within the budget on any machine. The quiz is what a newcomer can
check: Python idioms from the corpus, completed greedily, scored before and after pretraining.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import statistics
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
    steps: int | None = None  # None: as many as `minutes` allows, measured at run time
    minutes: float = 5.0  # the whole demo's time budget, when steps is None
    max_steps: int = 3000  # never more (a fast machine would see the small corpus too many times)
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = TrainConfig.optimizer
    seed: int = 1337
    prompts: tuple[str, ...] = ("def read_config(path):\n", "The standard library")
    device: str = "auto"  # auto: a CUDA GPU when there is one, at GPU_SIZE; else the CPU at the sizes above


# What the demo becomes on a GPU: ~6x the parameters (15.9M), steps of 4x the tokens, in bf16 (not yet
# timed on one: the budget decides the steps there too).
GPU_SIZE = dict(model=ModelConfig(vocab_size=4096, block_size=256, n_layer=8, n_head=8, n_embd=384, dropout=0.0),
                batch_size=64)

# Python idioms the standard library's source repeats: (prompt, what must follow). No prompt ends in
# a space: byte-level BPE writes a space with the word after it, so a prompt ending in one is unusual text.
QUIZ = (("if __name__ ==", " '__main__'"), ("if __name__ == '__main__':\n    unittest.", "main()"),
        ("    def __init__(", "self"), ("    def setUp(", "self)"), ("    def tearDown(", "self)"),
        ("    def __repr__(self", "):"), ("    def __eq__(self,", " other"), ("def wrapper(*args, **", "kwargs"),
        ("import unittest\n\n\nclass MiscTests(unittest.", "TestCase"), ("__all__ =", " ["),
        ("try:\n    import threading\nexcept", " ImportError"), ("        else", ":"),
        ("#!/usr/bin/env", " python"), ("encoding='utf-", "8'"),
        ("# Licensed to PSF under a Contributor", " Agreement"), ("Copyright (C) 2001 Python Software", " Foundation"))
# time a run leaves to what is not training steps, in step times (five evaluations of 20 batches) and seconds
RESERVE_STEPS, RESERVE_S = 35, 10.0
BUDGET_SHARE = 0.95  # step times drift up by a few % over a run (measured ~10 % on a 2-core Xeon)


def demo_device(cfg: DemoConfig) -> tuple[DemoConfig, torch.device]:
    """The device the demo runs on (gptkit.device), and the config for it: a bigger model when auto
    finds a GPU."""
    device = resolve_device(cfg.device)
    if cfg.device == "auto" and device.type == "cuda":
        cfg = dataclasses.replace(cfg, **GPU_SIZE)
    return dataclasses.replace(cfg, device=device.type), device


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict:
    cfg, device = demo_device(cfg)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    say("1/5 tokenizer: training byte-level BPE on the standard library's docs and source ...")
    tokenizer = BPETokenizer.train((text for _, text in stdlib_documents()), vocab_size=cfg.vocab_size)
    tokenizer.save(out / "tokenizer")
    say(f"    vocab {tokenizer.vocab_size} ({time.perf_counter() - t0:.0f}s)")

    say("2/5 prepare: tokenizing the corpus into shards ...")
    meta = prepare(["stdlib"], out / "tokenizer", out / "data", workers=2, val_fraction=0.01)
    say(f"    train {meta['splits']['train']['tokens']:,} tokens, val {meta['splits']['val']['tokens']:,} tokens "
        f"from {len(meta['sources'])} sources ({meta['seconds']:.0f}s)")

    torch.manual_seed(cfg.seed)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    model = GPT(model_cfg).to(device)
    data = TokenShards.from_dir(out / "data", model_cfg.block_size, cfg.batch_size, seed=cfg.seed, eval_batches=20)
    before = evaluate(model, data, lm_loss, contextlib.nullcontext(), _single(), data.bytes_per_token())
    quiz_before = quiz(model, tokenizer)
    train_cfg = TrainConfig(out_dir=str(out / "model"), max_steps=cfg.steps or 1, batch_size=cfg.batch_size,
                            lr=cfg.lr, eval_batches=20, seed=cfg.seed, weight_decay=0.1, beta2=0.99,
                            optimizer=cfg.optimizer)
    if cfg.steps is None:  # by time: what is left of the budget, at the step time measured here
        pilot_data = TokenShards.from_dir(out / "data", model_cfg.block_size, cfg.batch_size, seed=cfg.seed)
        step_s = seconds_per_step(model, out, train_cfg, tokenizer, pilot_data)
        left = BUDGET_SHARE * cfg.minutes * 60 - (time.perf_counter() - t0) - RESERVE_S
        steps = max(10, min(cfg.max_steps, int(left / step_s) - RESERVE_STEPS))
        budget = f"{steps} steps fit the {cfg.minutes:g}-minute budget at {step_s:.2f} s/step"
    else:
        steps, budget = cfg.steps, f"{cfg.steps} steps"
    train_cfg = dataclasses.replace(train_cfg, max_steps=steps, warmup_steps=min(100, steps // 10),
                                    eval_interval=max(1, steps // 4))
    say(f"3/5 pretrain on {device_name(device)}: {model.num_params() / 1e6:.1f}M-parameter GPT, {budget} "
        f"({cfg.batch_size}x{model_cfg.block_size} tokens each), {train_cfg.optimizer}; val loss before training "
        f"{before['val_loss']:.3f}")
    after = train(model, data, train_cfg, tokenizer, log=say)
    say(f"    val loss {before['val_loss']:.3f} -> {after['val_loss']:.3f} "
        f"(perplexity {before['val_ppl']:.0f} -> {after['val_ppl']:.1f}, bits/byte {after.get('val_bpb', 0):.2f})")

    answers = quiz(model, tokenizer)
    say(f"4/5 quiz: Python idioms from the corpus, completed greedily: {sum(ok for _, ok in answers)} of {len(QUIZ)} "
        f"right (before pretraining: {sum(ok for _, ok in quiz_before)} of {len(QUIZ)})")
    for (prompt, want), (got, ok) in zip(QUIZ, answers):
        say(f"    {'✓' if ok else '✗'} {prompt!r:38} -> {got!r}" + ("" if ok else f" (expected {want!r})"))

    say("5/5 samples (temperature 0.7, top-k 40):")
    engine = build_engine(model.eval(), tokenizer, max_batch=2, device=str(next(model.parameters()).device))
    samples = []
    for prompt in cfg.prompts:
        ids = tokenizer.encode(prompt)[-(model_cfg.block_size // 2):]  # a tiny context keeps the prompt's end
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
    return {"device": device_name(device), "steps": steps, "val_loss_before": before["val_loss"],
            "val_loss_after": after["val_loss"], "quiz_before": sum(ok for _, ok in quiz_before),
            "quiz_after": sum(ok for _, ok in answers), "quiz_items": len(QUIZ), "samples": samples,
            "checkpoint": str(ckpt), "minutes": (time.perf_counter() - t0) / 60}


def seconds_per_step(model: GPT, out: Path, cfg: TrainConfig, tokenizer, data) -> float:
    """Seconds per optimizer step of this model and config here: a copy trains 10 steps, and the
    median of the last 8 steps' times is taken (the first ones warm up allocators and caches; the
    mean of 4 steps once planned a third fewer steps than fitted, after a slow moment elsewhere on
    the machine); the real run starts from the untouched model."""
    stamps: list[float] = []
    pilot = dataclasses.replace(cfg, out_dir=str(out / "pilot"), max_steps=10, warmup_steps=1, eval_interval=0)
    try:
        train(copy.deepcopy(model), data, pilot, tokenizer, log=lambda m: None,
              on_step=lambda step, metrics: stamps.append(time.perf_counter()))
    finally:
        shutil.rmtree(out / "pilot", ignore_errors=True)
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def quiz(model: GPT, tokenizer: BPETokenizer) -> list[tuple[str, bool]]:
    """(greedy continuation, right?) for each QUIZ prompt: right when it starts with the answer."""
    engine = build_engine(model, tokenizer, max_batch=1, keep_model=True, device=str(next(model.parameters()).device))
    out = []
    for prompt, want in QUIZ:
        params = SampleConfig(max_tokens=len(tokenizer.encode(want)) + 2, temperature=0.0)
        ids = tokenizer.encode(prompt)[-(model.config.block_size - params.max_tokens):]  # a tiny context: the end
        got = completion_text(tokenizer, engine.generate(ids, params)[0])
        out.append((got, got.startswith(want)))
    return out


def _single():
    return Dist()
