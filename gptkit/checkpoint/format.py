"""The one checkpoint format: a folder every command reads and writes.

    RUN/latest, RUN/step-000400/, ...   the run layout (gptkit.checkpoint.rundir): a save goes to a new
                                        step folder, sealed by a manifest, then `latest` moves
    STEP/
      model.safetensors   weights (the tied LM head stored once, as wte.weight); step in metadata
      config.json         {"model": ModelConfig, "step", "train": TrainConfig, "extra": {...}}
      tokenizer_meta.json + the tokenizer's own files (tokenizer.json, ...)
      train_state.pt      optimizer, RNG and data-sampler state, for --resume only
                          (tensors and plain containers: loads with weights_only=True)
      manifest.json       written last: every file's size and sha256

Fine-tuned checkpoints may carry, in `extra` (all optional; plain checkpoints have none):
  heads  {name: [in, out]}  extra Linear heads on the GPT (`model.heads[name]`), stored in
                            model.safetensors under the prefix `heads.` (classification)
  lora   LoRAConfig dict    the target layers are LoRA layers (gptkit.model.lora)
  base   path               an adapter checkpoint: model.safetensors holds only the tensors that
                            were trained; the rest are the base checkpoint's

This module writes a checkpoint and reads the files of one step folder. Commands open a checkpoint
through `gptkit.checkpoint.open` (a run folder, one step folder, or a flat folder from before the
run layout), which resolves the folder and checks its manifest once. Non-finite tensors are refused
both ways: never saved, never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptkit.checkpoint.rundir import commit, temp_step_folder
from gptkit.errors import GptkitError
from gptkit.fileio import file_mode
from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT
from gptkit.model.heads import attach_heads
from gptkit.model.lora import LoRAConfig, apply_lora
from gptkit.text.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
TIED = ("lm_head.weight",)  # aliases of wte.weight when the head is tied: not stored
# Tests that kill a run inside a save set this to a number of seconds to sleep after each file.
SAVE_PAUSE_ENV = "GPTKIT_TEST_SAVE_PAUSE"

def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, tokenizer: Tokenizer | None, *,
                    step: int = 0, train_config=None, train_state: dict | None = None,
                    extra: dict | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model (+ tokenizer, + resume state) as folder/step-N and point folder/latest at it.
    Returns the step folder. Refuses (GptkitError) to write NaN or inf values. weights, if
    given, are written instead of model.state_dict() (FSDP gathers them on rank 0 first)."""
    run = Path(folder)
    model = unwrap(model)
    weights = model.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items() if k not in tied_keys(model)}
    if extra and extra.get("base"):  # an adapter checkpoint: only what training changed, not the base's copy
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    check_finite(state.items(), f"not saving step {step} to {run}: the weights")
    if train_state is not None:
        check_finite(_tensors(train_state), f"not saving step {step} to {run}: the training state")
    cfg = {"model": model.config.to_dict(), "step": step,
           "train": asdict(train_config) if train_config is not None else None, "extra": extra or {}}
    tmp = temp_step_folder(run, step)
    try:
        if train_state is not None:
            torch.save({"step": step, **train_state}, tmp / TRAIN_STATE)
            _test_pause()
        save_file(state, str(tmp / WEIGHTS), metadata={"step": str(step)})
        os.chmod(tmp / WEIGHTS, file_mode())  # safetensors writes 0600 whatever the umask
        _test_pause()
        if tokenizer is not None:
            tokenizer.save(tmp)
            _test_pause()
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _test_pause()
        return commit(tmp, run, step, pause=_test_pause)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _test_pause() -> None:
    seconds = float(os.environ.get(SAVE_PAUSE_ENV) or 0)
    if seconds:
        time.sleep(seconds)


def read_config(folder: Path) -> dict:
    """config.json of a step folder (or a flat checkpoint), its fields type-checked."""
    path = folder / CONFIG
    if not folder.is_dir():
        raise GptkitError(f"{folder}: checkpoint folder not found")
    if not path.is_file():
        raise GptkitError(f"{folder}: not a gptkit checkpoint (no {CONFIG}); "
                          "for a Hugging Face folder run `gptkit import-hf` first")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise GptkitError(f"{path}: not UTF-8 text") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise GptkitError(f"{path}: missing field 'model' (an object)")
    if not isinstance(cfg.get("step", 0), int) or isinstance(cfg.get("step"), bool):
        raise GptkitError(f"{path}: field 'step' is {cfg['step']!r}, expected an integer")
    if not isinstance(cfg.get("extra") or {}, dict):
        raise GptkitError(f"{path}: field 'extra' is {type(cfg['extra']).__name__}, expected an object")
    ModelConfig.from_dict(cfg["model"], where=str(path))  # type-checks every field
    return cfg


def build_model(folder: Path, cfg: dict, base: dict[str, torch.Tensor] | None = None) -> GPT:
    """The GPT a step folder holds, weights in fp32, on the CPU. Heads and LoRA layers named in
    `extra` are restored; an adapter checkpoint's frozen tensors are given as `base` (its base
    checkpoint's weights)."""
    model = GPT(ModelConfig.from_dict(cfg["model"]))
    extra = cfg.get("extra") or {}
    attach_heads(model, extra.get("heads") or {})
    if extra.get("lora"):
        apply_lora(model, LoRAConfig(**extra["lora"]))
    state = _read_weights(folder, cfg)
    if base is not None:
        state = {**base, **state}
    load_state(model, state, source=str(folder / WEIGHTS))
    return model


def _read_weights(folder: str | os.PathLike, cfg: dict) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            step = int((f.metadata() or {}).get("step", cfg.get("step", 0)))
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError, ValueError) as e:
        raise GptkitError(f"{path}: cannot read weights ({_first_line(e)})") from None
    if step != cfg.get("step", 0):
        raise GptkitError(f"{folder}: weights are from step {step} but {CONFIG} says step {cfg.get('step')} "
                          "(a save was interrupted); restore from a backup or retrain")
    check_finite(state.items(), str(path))
    return state


def tied_keys(model: GPT) -> tuple[str, ...]:
    """The keys that alias another tensor and are not stored: the head, when tied to wte."""
    return TIED if model.config.tie_embeddings else ()


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """GptkitError naming the first floating-point tensor with a NaN or inf."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise GptkitError(f"{source}: {name} has NaN or inf values")


def _tensors(obj, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor inside nested dicts and lists (an optimizer state)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_state(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, naming missing, unexpected and misshapen keys."""
    expected = {k: v for k, v in model.state_dict().items() if k not in tied_keys(model)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(TIED))
    if missing or unexpected:
        raise GptkitError(f"{source}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise GptkitError(f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False)


def load_train_state(folder: Path) -> dict:
    """The optimizer, data and RNG state of a step folder, checked: readable, from the same step
    as its weights, and free of NaN/inf."""
    path = folder / TRAIN_STATE
    if not path.is_file():
        raise GptkitError(f"{folder}: no {TRAIN_STATE} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file (zip, pickle, EOF, runtime)
        raise GptkitError(f"{path}: cannot read ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(k in state for k in ("step", "optimizer", "data", "rng")):
        raise GptkitError(f"{path}: not a gptkit training state (expected step, optimizer, data and rng)")
    step = read_config(folder).get("step")
    if state.get("step") != step:
        raise GptkitError(f"{path}: state is from step {state.get('step')} but {CONFIG} says step {step} "
                          "(a save was interrupted)")
    check_finite(_tensors(state["optimizer"]), f"{path}: optimizer state")
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model
