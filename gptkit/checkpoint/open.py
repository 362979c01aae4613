"""One way to open a checkpoint: `open_checkpoint(folder)` -> model, tokenizer and typed metadata.

A folder may be a run folder (RUN/latest names its newest step), one step folder, or a flat checkpoint
from before the run layout. It is resolved once, its manifest checked once (gptkit.checkpoint.rundir),
and every file is then read from that one step folder (gptkit.checkpoint.format). `read_meta` and
`open_tokenizer` resolve the same way for callers that need only the metadata or the tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptkit.checkpoint.format import CONFIG, build_model, read_config, save_checkpoint, tied_keys
from gptkit.checkpoint.rundir import is_checkpoint, resolve_checkpoint
from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.model.gpt import GPT
from gptkit.model.lora import merge_lora
from gptkit.text.tokenizer import Tokenizer, load_tokenizer


@dataclass
class CheckpointMeta:
    """config.json beside the weights, typed: what the commands read from `extra` by hand before."""

    path: Path  # the step folder the checkpoint resolved to
    model: ModelConfig
    step: int = 0
    train: dict | None = None  # the TrainConfig of the run that wrote it
    labels: list[str] = field(default_factory=list)  # classification labels (heads["classify"])
    heads: dict[str, list[int]] = field(default_factory=dict)
    lora: dict | None = None  # a LoRAConfig dict: the model has (unmerged) LoRA layers
    base: str | None = None  # an adapter checkpoint's base
    extra: dict = field(default_factory=dict)  # everything, including fields not listed here

    @property
    def is_lora(self) -> bool:
        return bool(self.lora)

    @classmethod
    def from_config(cls, path: Path, cfg: dict) -> "CheckpointMeta":
        extra = dict(cfg.get("extra") or {})
        return cls(path=path, model=ModelConfig.from_dict(cfg["model"]), step=int(cfg.get("step", 0)),
                   train=cfg.get("train"), labels=list(extra.get("labels") or []),
                   heads=dict(extra.get("heads") or {}), lora=extra.get("lora") or None,
                   base=extra.get("base"), extra=extra)


@dataclass
class Checkpoint:
    model: GPT  # eval mode, fp32, LoRA layers as stored
    tokenizer: Tokenizer
    meta: CheckpointMeta


def open_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Model (eval mode, fp32), tokenizer and typed meta of a run folder, a step folder or a flat
    checkpoint. An adapter checkpoint's base is opened the same way."""
    path = resolve_checkpoint(folder)
    cfg = read_config(path)
    base = _base_weights(cfg["extra"]["base"], path) if (cfg.get("extra") or {}).get("base") else None
    model = build_model(path, cfg, base)
    return Checkpoint(model.to(device).eval(), load_tokenizer(path), CheckpointMeta.from_config(path, cfg))


def read_meta(folder: str | os.PathLike) -> CheckpointMeta:
    """The typed metadata alone (no weights read): `gptkit info`, a resumed run's settings."""
    path = resolve_checkpoint(folder)
    return CheckpointMeta.from_config(path, read_config(path))


def open_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint (any folder open_checkpoint takes), or of a tokenizer folder."""
    return load_tokenizer(resolve_checkpoint(folder))


def merge_lora_checkpoint(folder: str | os.PathLike, out: str | os.PathLike) -> tuple[int, GPT]:
    """Fold a LoRA checkpoint's adapters into their layers and save it to out as a standalone
    checkpoint (no base needed, identical outputs). Returns the layers merged and the model."""
    loaded = open_checkpoint(folder)
    if not loaded.meta.is_lora:
        raise GptkitError(f"{folder}: not a LoRA checkpoint (no extra.lora in {CONFIG})")
    n = merge_lora(loaded.model)
    extra = {k: v for k, v in loaded.meta.extra.items() if k not in ("lora", "base")} | {"merged_from": str(folder)}
    save_checkpoint(out, loaded.model, loaded.tokenizer, step=loaded.meta.step, extra=extra)
    return n, loaded.model


def _base_weights(base: str, folder: Path) -> dict[str, torch.Tensor]:
    if not is_checkpoint(Path(base)):
        raise GptkitError(f"{folder}: its base checkpoint {base} (extra.base in {CONFIG}) is missing; "
                          "adapter checkpoints need their base (`gptkit merge-lora` makes a standalone one)")
    base_model = open_checkpoint(base).model
    return {k: v for k, v in base_model.state_dict().items() if k not in tied_keys(base_model)}
