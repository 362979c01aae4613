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
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from gptkit.checkpoint.format import save_checkpoint, unwrap
from gptkit.checkpoint.rundir import RunLock, clean_leftovers, prune, resume_candidate
from gptkit.config import TrainConfig
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_text
from gptkit.training import history
from gptkit.training.distributed import Dist, full_model_state, grad_sync, optimizer_state, wrap
from gptkit.training.optim import Optimizers, configure_optimizer, lr_at
from gptkit.training.resume import check_same_optimizer, read_state, resume_layout, restore, rng_state

# (model, batch) -> the loss, or a dict of metrics holding it under "loss" (evaluations log them all)
LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor | dict[str, torch.Tensor]]


def lm_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """Next-token cross-entropy; targets of -100 are ignored (prompt tokens, padding)."""
    x, y = batch
    return model(x, targets=y)


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, loss_fn: LossFn, amp: contextlib.AbstractContextManager,
             dist_info: Dist, bytes_per_token: float | None = None) -> dict[str, float]:
    """Mean loss (and whatever else the loss function reports) over each validation set,
    averaged across processes, with perplexity and bits per byte for a language model's."""
    model.eval()
    out: dict[str, float] = {}
    for name, batches in data.val_sets().items():
        sums: dict[str, float] = {}
        for batch in batches:
            with amp:
                for key, value in _metrics(loss_fn(model, _to(batch, _device_of(model)))).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        total = torch.tensor([*sums.values(), float(len(batches))], dtype=torch.float64)
        if dist_info.world_size > 1:
            dist.all_reduce(total)
        for key, value in zip(sums, (total[:-1] / total[-1]).tolist()):
            out[f"val_{key}" if name == "val" else f"val_{key}/{name}"] = value
    model.train()
    losses = [v for k, v in out.items() if k.startswith("val_loss/")]
    if "val_loss" not in out and losses:  # several named sets: their mean is the headline
        out["val_loss"] = sum(losses) / len(losses)
    language_model = all(k.startswith("val_loss") for k in out)  # not, e.g., DPO's loss on pairs
    if "val_loss" in out and language_model:
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
        if bytes_per_token:
            out["val_bpb"] = out["val_loss"] / math.log(2) / bytes_per_token
    return out


def _metrics(out: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loss function returns the loss, or a dict of metrics with the loss under "loss"."""
    return out if isinstance(out, dict) else {"loss": out}


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)


@dataclass
class _Run:
    """What one call of train() carries from step to step: the model in its three forms (raw,
    wrapped for DDP/FSDP, compiled), the optimizer, where metrics and checkpoints go."""
    raw: torch.nn.Module
    wrapped: torch.nn.Module
    runner: torch.nn.Module
    optimizer: Optimizers | torch.optim.Optimizer
    data: object
    cfg: TrainConfig
    tokenizer: object
    loss_fn: LossFn
    extra: dict | None
    dist_info: Dist
    log: Callable[[str], None]
    amp: contextlib.AbstractContextManager
    start_step: int
    saved: list[Path]
    history: list[dict] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def end_step(self) -> int:
        return min(self.cfg.max_steps, self.cfg.stop_at or self.cfg.max_steps)

    def record(self, entry: dict) -> None:
        """One line of metrics.jsonl (written by rank 0), kept for the loss plot."""
        self.history.append(entry)
        if self.dist_info.master:
            with (self.out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def checkpoint(self, step: int) -> None:
        weights = full_model_state(self.raw)  # under FSDP: gathered on rank 0, with every process taking part
        opt_state = optimizer_state(self.raw, self.optimizer) if self.dist_info.master or weights is not None else None
        if self.dist_info.master:
            state = {"optimizer": opt_state, "data": self.data.state_dict(), "rng": rng_state()}
            self.saved.insert(0, save_checkpoint(self.out_dir, self.raw, self.tokenizer, step=step,
                                                 train_config=self.cfg, train_state=state, extra=self.extra,
                                                 weights=weights))
            prune(self.out_dir, self.saved[:self.cfg.keep])
            history.plot(self.history, self.out_dir / "loss.png")


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
    log = log if dist_info.master else (lambda m: None)  # one process speaks for the job
    cfg = _fit_warmup(cfg, log)
    # one run per folder: rank 0 holds its lock until the run ends (or its process dies)
    with RunLock(cfg.out_dir) if dist_info.master else contextlib.nullcontext():
        return _train(model, data, cfg, tokenizer, loss_fn, resume, extra, dist_info, log, on_step)


def _train(model, data, cfg: TrainConfig, tokenizer, loss_fn: LossFn, resume: bool | Path, extra: dict | None,
           dist_info: Dist, log: Callable[[str], None], on_step: Callable[[int, dict], None] | None) -> dict:
    run = _start(model, data, cfg, tokenizer, loss_fn, resume, extra, dist_info, log)
    if run.start_step >= run.end_step:  # a finished run resumed: its last metrics, nothing trained
        log(f"the run is at step {run.start_step} of --max-steps {cfg.max_steps}: nothing to train "
            "(raise --max-steps to train further)")
        return _last_metrics(run.history, run.start_step)
    progress = history.progress_bar(run.start_step, cfg, run.dist_info)
    bpt = data.bytes_per_token() if hasattr(data, "bytes_per_token") else None
    last: dict = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(run.start_step, run.end_step):
        lr = lr_at(step, cfg)
        try:
            loss_value, tokens_per_step = _optimizer_step(run, lr, step)
        except GptkitError:
            progress.close()
            raise
        done = step + 1
        last = _report_step(run, progress, done, loss_value, lr, tokens_per_step, time.perf_counter() - t0)
        if on_step:
            on_step(done, last)
        is_eval = cfg.eval_interval > 0 and (done % cfg.eval_interval == 0 or done == cfg.max_steps)
        if is_eval:
            last.update(_evaluate_and_report(run, progress, done, bpt))
        if is_eval or done == run.end_step or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0):
            run.checkpoint(done)
    progress.close()
    return last


def _last_metrics(rows: list[dict], step: int) -> dict:
    """The newest value of every metric logged up to step (what train() returns at its end)."""
    out: dict = {"step": step}
    for row in rows:
        out.update({k: v for k, v in row.items() if k != "step"})
    return out


def _fit_warmup(cfg: TrainConfig, log: Callable[[str], None]) -> TrainConfig:
    """A warmup as long as the run would never reach the learning rate nor decay it (a shortened
    first run hits it): it becomes a tenth of the run, said in one line."""
    if cfg.warmup_steps < cfg.max_steps:
        return cfg
    warmup = max(1, cfg.max_steps // 10)
    log(f"warning: --warmup-steps {cfg.warmup_steps} >= --max-steps {cfg.max_steps}: the learning rate would never "
        f"reach --lr nor decay; warming up over {warmup} steps (a tenth of the run) instead")
    return dataclasses.replace(cfg, warmup_steps=warmup)


def _start(model, data, cfg: TrainConfig, tokenizer, loss_fn: LossFn, resume: bool | Path, extra: dict | None,
           dist_info: Dist, log: Callable[[str], None]) -> _Run:
    """Seed, clean up after an interrupted save, wrap and compile the model, build the optimizer,
    restore a resumed run's state, and start (or trim, on resume) metrics.jsonl."""
    device = _device_of(model)
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed + dist_info.rank)
    amp_dtype = autocast_dtype(cfg, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if dist_info.master:
        removed = clean_leftovers(out_dir, log)
        if removed:
            log(f"removed what an interrupted save left in {out_dir}: {', '.join(removed)}")
    start_step, saved = 0, []
    if resume:  # read and checked while the weights are still whole, restored once the optimizer exists
        src = resume if isinstance(resume, Path) else resume_candidate(out_dir, log)
        resume_state = read_state(src, model)
        check_same_optimizer(src, cfg)
    raw = unwrap(model)
    wrapped = wrap(raw, cfg, dist_info, amp_dtype)  # before the optimizer: FSDP replaces the parameters
    optimizer = configure_optimizer(raw, cfg, device)
    if resume:
        start_step = restore(resume_state, raw, optimizer, data)
        saved = resume_layout(out_dir, src, start_step, dist_info, log)
        log(f"resumed from {src} at step {start_step}")
    runner = torch.compile(wrapped) if cfg.compile else wrapped
    run = _Run(raw, wrapped, runner, optimizer, data, cfg, tokenizer, loss_fn, extra, dist_info, log, amp,
               start_step, saved)
    if dist_info.master:
        metrics_path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        # on resume, forget what was logged after the checkpoint: those steps are about to rerun
        kept = [h for h in history.read_history(metrics_path, log) if h["step"] <= start_step] if resume else []
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in kept))
        run.history = kept
    return run


def _optimizer_step(run: _Run, lr: float, step: int) -> tuple[float, int]:
    """One optimizer step over cfg.grad_accum micro-batches; returns the step's loss and tokens.
    A non-finite loss or gradient norm stops the run before the optimizer touches the weights."""
    cfg, dist_info = run.cfg, run.dist_info
    device = _device_of(run.raw)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum = torch.zeros((), device=device)
    tokens_per_step = 0
    for micro in range(cfg.grad_accum):
        batch = _to(run.data.train_batch(), device)
        tokens_per_step = batch[0].numel() * dist_info.world_size * cfg.grad_accum
        sync = micro == cfg.grad_accum - 1 or dist_info.world_size == 1
        with grad_sync(run.wrapped, sync), run.amp:
            loss = _metrics(run.loss_fn(run.runner, batch))["loss"] / cfg.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    params = list(run.raw.parameters())
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:  # the norm is still needed for the NaN guard
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if dist_info.world_size > 1:  # the logged loss is the global batch's
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the shards' norms still to be combined
        grad_norm = grad_norm.full_tensor()
    loss_value, norm_value = loss_sum.item(), float(grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        what = f"loss became {loss_value}" if not math.isfinite(loss_value) else f"gradient norm became {norm_value}"
        kept = (f"the last good checkpoint, {run.saved[0]}, is kept" if run.saved
                else f"no checkpoint had been saved in {run.out_dir} yet")
        raise GptkitError(f"{what} at step {step + 1}; stopped without saving: {kept} (lower --lr or check the data)")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, tokens_per_step


def _report_step(run: _Run, progress, done: int, loss_value: float, lr: float, tokens_per_step: int,
                 elapsed: float) -> dict:
    """The step's metrics: to metrics.jsonl every log_interval, to the bar, or (no terminal) a line every 10%."""
    cfg = run.cfg
    tok_s = tokens_per_step * (done - run.start_step) / max(elapsed, 1e-9)
    last = {"step": done, "loss": loss_value, "lr": lr, "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed, 2)}
    if done % cfg.log_interval == 0 or done == run.end_step:
        run.record(dict(last))
    progress.update(1)
    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
    if progress.disable and cfg.progress and run.dist_info.master and done % max(1, cfg.max_steps // 10) == 0:
        eta = elapsed / (done - run.start_step) * (run.end_step - done)
        run.log(f"step {done}/{cfg.max_steps}: loss {loss_value:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s, "
                f"ETA {eta:.0f}s")
    return last


def _evaluate_and_report(run: _Run, progress, done: int, bpt: float | None) -> dict:
    ev = evaluate(run.raw, run.data, run.loss_fn, run.amp, run.dist_info, bpt)
    if ev:  # empty when there is no validation data
        run.record({"step": done, **ev})
        if run.dist_info.master:  # above the bar when there is one
            (run.log if progress.disable else progress.write)(history.format_eval(done, ev))
    return ev
