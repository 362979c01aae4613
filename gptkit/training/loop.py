"""The one training loop: pretraining and every kind of fine-tuning run through `train()`.

What varies between them is passed in: the batch source (see gptkit.data.shards), the loss
function (model, batch) -> scalar, and extra checkpoint fields. The loop owns the rest:
AdamW with decay on matrices only, warmup + cosine LR, gradient accumulation and
clipping, autocast, periodic evaluation (loss, perplexity, bits per byte), JSONL metrics,
a progress bar, a loss-curve PNG, crash-safe checkpoints (gptkit.checkpoint.rundir: a new step folder
per save, the newest `keep` kept), exact resume from the newest intact one, a NaN stop (loss
and gradient norm) that never saves, and DDP or FSDP2 under torchrun (gloo on CPU, nccl on
GPU; gptkit.training.distributed) with no code change.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from gptkit.checkpoint.format import WEIGHTS, check_finite, load_train_state, read_config, save_checkpoint, unwrap
from gptkit.checkpoint.open import open_checkpoint
from gptkit.checkpoint.rundir import clean_leftovers, point_latest, prune, resume_candidate, step_folders, step_of
from gptkit.config import TrainConfig
from gptkit.data.shards import TokenShards, read_meta
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write, atomic_write_text
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import load_tokenizer
from gptkit.training.distributed import (Dist, close_distributed, full_model_state, grad_sync, init_distributed,
                                         load_optimizer_state, optimizer_state, pick_device, processes, wrap)
from gptkit.training.optim import Muon, Optimizers

LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """Next-token cross-entropy; targets of -100 are ignored (prompt tokens, padding)."""
    x, y = batch
    return model(x, targets=y)


# ---------------------------------------------------------------------------- set-up
def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays: on GPUs that support it. On CPU, fp32 is the default
    because it measured faster for the model sizes a CPU can train (see BENCHMARKS.md)."""
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices (Linear and embedding weights) only, not on biases,
    LayerNorm or 1-d parameters; fused kernel where this torch build offers it.
    With cfg.optimizer == "muon", the 2-d weights inside the transformer blocks go to Muon
    instead (embeddings, the head, norms, biases, classification heads and LoRA adapters stay
    with AdamW, as Muon is meant for hidden matrices only)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise GptkitError("no trainable parameters")
    hidden = [p for n, p in named if cfg.optimizer == "muon" and _is_hidden_matrix(n, p)]
    rest = [p for n, p in named if not any(p is h for h in hidden)]
    adamw = _adamw(rest, cfg) if rest else None
    if not hidden:
        return adamw
    muon = Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
    for g in muon.param_groups:
        g["lr_scale"] = cfg.muon_lr_scale
    return Optimizers(*[o for o in (muon, adamw) if o is not None])


def _is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    parts = name.split(".")
    return p.dim() == 2 and parts[0] == "h" and not any(part.startswith("lora") for part in parts)


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, data, loss_fn: LossFn, amp: contextlib.AbstractContextManager,
             dist_info: Dist, bytes_per_token: float | None = None) -> dict[str, float]:
    """Mean loss over each validation set (averaged across processes), with perplexity and
    bits per byte for the main one."""
    model.eval()
    out: dict[str, float] = {}
    for name, batches in data.val_sets().items():
        total = torch.zeros(2)
        for batch in batches:
            with amp:
                total += torch.tensor([loss_fn(model, _to(batch, _device_of(model))).float().item(), 1.0])
        if dist_info.world_size > 1:
            dist.all_reduce(total)
        out[f"{name}_loss" if name == "val" else f"val_loss/{name}"] = (total[0] / total[1]).item()
    model.train()
    if "val_loss" not in out and out:  # several named sets: their mean is the headline
        out["val_loss"] = sum(out.values()) / len(out)
    if "val_loss" in out:
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
        if bytes_per_token:
            out["val_bpb"] = out["val_loss"] / math.log(2) / bytes_per_token
    return out


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)


# ---------------------------------------------------------------------------- the loop
def train(model: torch.nn.Module, data, cfg: TrainConfig, tokenizer=None, *, loss_fn: LossFn = lm_loss,
          resume: bool | Path = False, extra: dict | None = None, dist_info: Dist | None = None,
          log: Callable[[str], None] = print, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train model on data for cfg.max_steps optimizer steps; returns the last metrics.

    Checkpoints go to cfg.out_dir/step-N at every evaluation and at the end (rank 0 only).
    With resume=True the run continues from the newest intact checkpoint in cfg.out_dir (or
    from the step folder resume names: the one the caller loaded the weights from) exactly as
    if it had never stopped (same weights, optimizer, data order and RNG).
    on_step(step, metrics), if given, runs after every optimizer step (benchmarks use it to
    snapshot the weights on the way).
    """
    dist_info = dist_info or Dist()
    device = _device_of(model)
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed + dist_info.rank)
    amp_dtype = autocast_dtype(cfg, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if dist_info.master:
        removed = clean_leftovers(out_dir)
        if removed:
            log(f"removed what an interrupted save left in {out_dir}: {', '.join(removed)}")
    start_step, saved, resume_state = 0, [], None
    if resume:  # read and checked while the weights are still whole, restored once the optimizer exists
        src = resume if isinstance(resume, Path) else resume_candidate(out_dir, log)
        resume_state = _read_state(src, model)
        _check_same_optimizer(src, cfg)
    raw = unwrap(model)
    wrapped = wrap(raw, cfg, dist_info, amp_dtype)  # before the optimizer: FSDP replaces the parameters
    optimizer = configure_optimizer(raw, cfg, device)
    if resume:
        start_step = _restore(resume_state, raw, optimizer, data)
        saved = _resume_layout(out_dir, src, start_step, dist_info, log)
        log(f"resumed from {src} at step {start_step}")
    runner = torch.compile(wrapped) if cfg.compile else wrapped
    bpt = data.bytes_per_token() if hasattr(data, "bytes_per_token") else None
    metrics_path = out_dir / "metrics.jsonl"
    if dist_info.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(metrics_path, "")
    # on resume, forget what was logged after the checkpoint: those steps are about to rerun
    history = [h for h in _read_history(metrics_path, log) if h["step"] <= start_step] if dist_info.master else []
    if dist_info.master and resume:
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    def checkpoint(step: int) -> None:
        weights = full_model_state(raw)  # under FSDP: gathered on rank 0, with every process taking part
        opt_state = optimizer_state(raw, optimizer) if dist_info.master or weights is not None else None
        if dist_info.master:
            state = {"optimizer": opt_state, "data": data.state_dict(), "rng": _rng_state()}
            saved.insert(0, save_checkpoint(out_dir, raw, tokenizer, step=step, train_config=cfg,
                                            train_state=state, extra=extra, weights=weights))
            prune(out_dir, saved[:cfg.keep])
            _plot(history, out_dir / "loss.png")

    def record(entry: dict) -> None:
        history.append(entry)
        if dist_info.master:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    progress = _progress(start_step, cfg, dist_info)
    tokens_per_step = 0
    last = {}
    t0 = time.perf_counter()
    model.train()
    end_step = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    for step in range(start_step, end_step):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = _to(data.train_batch(), device)
            tokens_per_step = batch[0].numel() * dist_info.world_size * cfg.grad_accum
            sync = micro == cfg.grad_accum - 1 or dist_info.world_size == 1
            with grad_sync(wrapped, sync), amp:
                loss = loss_fn(runner, batch) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:  # the norm is still needed for the NaN guard
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if dist_info.world_size > 1:  # the logged loss is the global batch's
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the shards' norms still to be combined
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = loss_sum.item(), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            progress.close()
            what = f"loss became {loss_value}" if not math.isfinite(loss_value) else f"gradient norm became {norm_value}"
            raise GptkitError(f"{what} at step {step + 1}; stopped without saving. "
                              f"The last good checkpoint in {out_dir} is kept (lower --lr or check the data)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        done = step + 1
        tok_s = tokens_per_step * (done - start_step) / max(elapsed, 1e-9)
        last = {"step": done, "loss": loss_value, "lr": lr, "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed, 2)}
        if done % cfg.log_interval == 0 or done == end_step:
            record(last)
        if on_step:
            on_step(done, last)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if progress.disable and cfg.progress and dist_info.master and done % max(1, cfg.max_steps // 10) == 0:
            eta = elapsed / (done - start_step) * (end_step - done)
            log(f"step {done}/{cfg.max_steps}: loss {loss_value:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s, "
                f"ETA {eta:.0f}s")
        is_eval = cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.max_steps)
        if is_eval:
            ev = evaluate(raw, data, loss_fn, amp, dist_info, bpt)
            if ev:  # empty when there is no validation data
                record({"step": done, **ev})
                last.update(ev)
            if ev and dist_info.master:  # above the bar when there is one
                (log if progress.disable else progress.write)(_format_eval(done, ev))
        if is_eval or done == end_step or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0):
            checkpoint(done)
    progress.close()
    return last


def _format_eval(step: int, ev: dict) -> str:
    return f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items())


def _read_state(src: Path, model: torch.nn.Module) -> dict:
    """The optimizer, data and RNG state of checkpoint src; the weights must be src's too (the
    caller loaded them), and finite."""
    state = load_train_state(src)
    check_finite(unwrap(model).state_dict().items(), f"{src / WEIGHTS} (as loaded)")
    return state


def _check_same_optimizer(src: Path, cfg: TrainConfig) -> None:
    """Resuming needs the optimizer that wrote the state (AdamW before Muon became the default)."""
    saved = (read_config(src).get("train") or {}).get("optimizer", "adamw")  # runs before the option: AdamW
    if saved != cfg.optimizer:
        raise GptkitError(f"{src} was trained with --optimizer {saved}; resume it with --optimizer {saved} "
                          f"(not {cfg.optimizer})")


def _restore(state: dict, model: torch.nn.Module, optimizer, data) -> int:
    load_optimizer_state(model, optimizer, state["optimizer"])
    data.load_state_dict(state["data"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def _resume_layout(out_dir: Path, src: Path, start_step: int, dist_info: Dist, log) -> list[Path]:
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _read_history(path: Path, warn: Callable[[str], None] = print) -> list[dict]:
    """metrics.jsonl's entries. A partial last line (a kill while it was written) is dropped
    with a warning; a damaged line elsewhere is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    entries = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                warn(f"warning: {path}:{i + 1}: dropped a partial last line (the run was killed while writing it)")
                break
            raise GptkitError(f"{path}:{i + 1}: damaged metrics line ({e})") from None
        entries.append(entry)
    return entries


def _progress(start: int, cfg: TrainConfig, dist_info: Dist):
    from tqdm.auto import tqdm

    # Off when stderr is not a terminal (logs, CI): the loop then logs a plain line every 10%.
    return tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and dist_info.master and sys.stderr.isatty()), mininterval=0.5)


def _plot(history: list[dict], path: Path) -> None:
    """Train and validation loss against step, written next to the checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------- pretraining
def pretrain(data_dir: str | Path, model_config, cfg: TrainConfig, *, init_from: str | None = None,
             resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Pretrain a GPT on the token shards in data_dir (from `gptkit prepare`).

    A new model gets model_config (its vocab_size taken from the data's tokenizer);
    init_from starts from a checkpoint's weights instead; resume continues cfg.out_dir.
    """

    dist_info = init_distributed()
    device = pick_device(dist_info)
    meta = read_meta(data_dir)
    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
    if resume:  # the newest intact checkpoint; train() restores the rest of its state
        resume = resume_candidate(cfg.out_dir, log)
        model = open_checkpoint(resume).model
    elif init_from:
        model = open_checkpoint(init_from).model
    else:
        model_config.vocab_size = tokenizer.vocab_size
        torch.manual_seed(cfg.seed)  # the same initial weights in every process and every rerun
        model = GPT(model_config)
    if model.config.vocab_size < meta["vocab_size"]:
        raise GptkitError(f"model vocab_size {model.config.vocab_size} < the data's tokenizer vocab "
                          f"{meta['vocab_size']} ({data_dir})")
    model.to(device).train()
    data = TokenShards.from_dir(data_dir, model.config.block_size, cfg.batch_size, seed=cfg.seed,
                       eval_batches=cfg.eval_batches, rank=dist_info.rank, world_size=dist_info.world_size)
    if dist_info.master:
        log(f"model: {model.num_params() / 1e6:.2f}M parameters, {processes(dist_info, cfg, device)}; "
            f"train tokens {meta['splits']['train']['tokens']:,}, val {meta['splits']['val']['tokens']:,}")
    try:
        return train(model, data, cfg, tokenizer, resume=resume, dist_info=dist_info, log=log)
    finally:
        close_distributed(dist_info)
