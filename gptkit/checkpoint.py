"""The one checkpoint format: a folder every command reads and writes.

    CKPT/
      model.safetensors   weights (the tied LM head stored once, as wte.weight); step in metadata
      config.json         {"model": ModelConfig, "step", "train": TrainConfig, "extra": {...}}
      tokenizer_meta.json + the tokenizer's own files (tokenizer.json, ...)
      train_state.pt      optimizer, RNG and data-sampler state, for --resume only
                          (tensors and plain containers: loads with weights_only=True)

Fine-tuned checkpoints may carry, in `extra` (all optional; plain checkpoints have none):
  heads  {name: [in, out]}  extra Linear heads on the GPT (`model.heads[name]`), stored in
                            model.safetensors under the prefix `heads.` (classification)
  lora   LoRAConfig dict    the target layers are LoRA layers (gptkit.lora)
  base   path               an adapter checkpoint: model.safetensors holds only the tensors that
                            were trained; the rest are the base checkpoint's

Every file is written atomically, and the three that carry a step are checked to agree on
load, so a run killed mid-save is detected instead of resumed from a mixed state.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.config import GptkitError, ModelConfig
from gptkit.fileio import atomic_write, atomic_write_json
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
TIED = ("lm_head.weight",)  # aliases of wte.weight, not stored


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, tokenizer: Tokenizer | None, *,
                    step: int = 0, train_config=None, train_state: dict | None = None,
                    extra: dict | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model (+ tokenizer, + resume state) into folder. Returns the folder.
    weights, if given, are written instead of model.state_dict() (FSDP gathers them first)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    if train_state is not None:  # first, so a crash before the weights leaves a detectable mismatch
        atomic_write(folder / TRAIN_STATE, lambda tmp: torch.save({"step": step, **train_state}, tmp))
    weights = model.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items() if k not in TIED}
    if extra and extra.get("base"):  # an adapter checkpoint: only what training changed, not the base's copy
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"step": str(step)}))
    if tokenizer is not None:
        tokenizer.save(folder)
    cfg = {"model": model.config.to_dict(), "step": step,
           "train": asdict(train_config) if train_config is not None else None, "extra": extra or {}}
    atomic_write_json(folder / CONFIG, cfg)
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG
    if not Path(folder).is_dir():
        raise GptkitError(f"{folder}: checkpoint folder not found")
    if not path.is_file():
        raise GptkitError(f"{folder}: not a gptkit checkpoint (no {CONFIG}); "
                          "for a Hugging Face folder run `gptkit import-hf` first")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if "model" not in cfg:
        raise GptkitError(f"{path}: missing field 'model'")
    return cfg


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model in eval mode (weights in fp32) and the checkpoint's config dict.
    Heads, LoRA layers and a base checkpoint named in `extra` are restored too."""
    cfg = read_config(folder)
    model = GPT(ModelConfig.from_dict(cfg["model"]))
    extra = cfg.get("extra") or {}
    attach_heads(model, extra.get("heads") or {})
    if extra.get("lora"):
        from gptkit.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(**extra["lora"]))
    state = _read_weights(folder, cfg)
    if extra.get("base"):
        state = {**_base_weights(extra["base"], folder), **state}
    load_state(model, state, source=str(Path(folder) / WEIGHTS))
    return model.to(device).eval(), cfg


def _read_weights(folder: str | os.PathLike, cfg: dict) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            step = int((f.metadata() or {}).get("step", cfg.get("step", 0)))
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise GptkitError(f"{path}: cannot read weights ({e})") from None
    if step != cfg.get("step", 0):
        raise GptkitError(f"{folder}: weights are from step {step} but {CONFIG} says step {cfg.get('step')} "
                          "(a save was interrupted); restore from a backup or retrain")
    return state


def _base_weights(base: str, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    if not (Path(base) / CONFIG).is_file():
        raise GptkitError(f"{folder}: its base checkpoint {base} (extra.base in {CONFIG}) is missing; "
                          "adapter checkpoints need their base (`gptkit merge-lora` makes a standalone one)")
    base_model, _ = load_model(base)
    return {k: v for k, v in base_model.state_dict().items() if k not in TIED}


def attach_heads(model: GPT, heads: dict[str, list[int]]) -> None:
    """Add Linear heads (in_features, out_features) as model.heads[name]; their weights load
    and save under `heads.<name>.` like every other tensor."""
    if heads:
        model.heads = torch.nn.ModuleDict({name: torch.nn.Linear(*shape) for name, shape in heads.items()})


def load_state(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, naming missing, unexpected and misshapen keys."""
    expected = {k: v for k, v in model.state_dict().items() if k not in TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(TIED))
    if missing or unexpected:
        raise GptkitError(f"{source}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise GptkitError(f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False)


def load_train_state(folder: str | os.PathLike) -> dict:
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise GptkitError(f"{folder}: no {TRAIN_STATE} to resume from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    step = read_config(folder).get("step")
    if state.get("step") != step:
        raise GptkitError(f"{path}: state is from step {state.get('step')} but {CONFIG} says step {step} "
                          "(a save was interrupted)")
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model
