"""Resuming a run, in one place: which checkpoint it continues from, the weights it starts with, and
the optimizer, data order and RNG state restored once the optimizer exists (bit-exact: tests/test_crash.py).

    ckpt = resume_checkpoint(out_dir, log)        # pretrain / finetune: the weights (and tokenizer)
    train(ckpt.model, ..., resume=ckpt.meta.path)  # the loop restores the rest from the same step folder
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

import torch

from gptkit.checkpoint.format import WEIGHTS, check_finite, load_train_state, read_config, unwrap
from gptkit.checkpoint.open import Checkpoint, open_checkpoint
from gptkit.checkpoint.rundir import point_latest, resume_candidate, step_folders, step_of
from gptkit.config import ModelConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.training.distributed import Dist, load_optimizer_state


def resume_checkpoint(out_dir: str | Path, log: Callable[[str], None]) -> Checkpoint:
    """The newest intact checkpoint of the run in out_dir, opened (damaged newer ones are reported)."""
    return open_checkpoint(resume_candidate(out_dir, log))


def read_state(src: Path, model: torch.nn.Module) -> dict:
    """The optimizer, data and RNG state of checkpoint src; the weights must be src's too (the
    caller loaded them), and finite."""
    state = load_train_state(src)
    check_finite(unwrap(model).state_dict().items(), f"{src / WEIGHTS} (as loaded)")
    return state


def check_same_optimizer(src: Path, cfg: TrainConfig) -> None:
    """Resuming needs the optimizer that wrote the state (AdamW before Muon became the default)."""
    saved = (read_config(src).get("train") or {}).get("optimizer", "adamw")  # runs before the option: AdamW
    if saved == "muon" and cfg.strategy == "fsdp":  # advice that FSDP would then refuse helps nobody
        raise GptkitError(f"{src} was trained with Muon, which --strategy fsdp cannot run (it shards the matrices "
                          "Muon orthogonalizes); resume it with --strategy ddp")
    if saved != cfg.optimizer:
        raise GptkitError(f"{src} was trained with --optimizer {saved}; resume it with --optimizer {saved} "
                          f"(not {cfg.optimizer})")


def check_same_run(ckpt: Checkpoint, asked: ModelConfig | None, data: dict) -> None:
    """--resume continues a run as it was: model options that contradict its checkpoint, or
    another dataset, are refused in one line (what may change: lr, steps, eval and checkpoint
    cadence, batch and process count)."""
    if asked is not None:
        have = ckpt.model.config
        asked = dataclasses.replace(asked, vocab_size=have.vocab_size)
        diff = [f"{f.name}={getattr(have, f.name)!r}, not {getattr(asked, f.name)!r}"
                for f in dataclasses.fields(have) if getattr(have, f.name) != getattr(asked, f.name)]
        if diff:
            raise GptkitError(f"--resume: the run in {ckpt.meta.path.parent} has {'; '.join(diff[:4])}; leave --preset "
                              "and the model options out to resume it, or start a new run (--init-from to begin from "
                              "its weights)")
    trained_on = ckpt.meta.extra.get("data")
    same = ("vocab_size", "train_tokens", "val_tokens")  # the content, wherever the folder now is
    if trained_on is not None and any(trained_on.get(k) != data[k] for k in same):
        raise GptkitError(f"--resume: the run was trained on {trained_on['path']} ({trained_on['train_tokens']:,} "
                          f"train tokens, vocab {trained_on['vocab_size']}), not on {data['path']} "
                          f"({data['train_tokens']:,}, vocab {data['vocab_size']}); resume with that data, or start a "
                          "new run with --init-from")


def restore(state: dict, model: torch.nn.Module, optimizer, data) -> int:
    load_optimizer_state(model, optimizer, state["optimizer"])
    data.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return int(state["step"])


def resume_layout(out_dir: Path, src: Path, start_step: int, dist_info: Dist, log) -> list[Path]:
    """Point `latest` at the checkpoint resumed from and drop newer (damaged: they were
    skipped) step folders; returns the kept ones, newest first, for --keep."""
    if not dist_info.master:
        return []
    point_latest(out_dir, src)
    kept = []
    for p in step_folders(out_dir):
        if step_of(p) > start_step:
            log(f"removing {p}: newer than the checkpoint resumed from, and not intact")
            shutil.rmtree(p, ignore_errors=True)
        else:
            kept.append(p)
    return kept


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
