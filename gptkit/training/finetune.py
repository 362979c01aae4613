"""Fine-tuning: the data files (gptkit.data.records) and a base checkpoint, adapted as the tasks need
(gptkit.model.heads, gptkit.model.lora), through the one trainer.

Several files make a multi-task mixture sampled with weights, with one validation loss per task
(`val_loss/<task>`). Classification trains a head on the last real token (gptkit.model.heads).
Preference pairs train with DPO (gptkit.training.preference) instead of imitation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.checkpoint.open import open_checkpoint
from gptkit.config import TrainConfig
from gptkit.data.pairs import pair_examples
from gptkit.data.records import PREFERENCE, Mixture, Record, TaskBatches, class_examples, lm_examples, read_records
from gptkit.errors import GptkitError
from gptkit.model.heads import CLASSIFY_HEAD, add_class_head, class_logits, resize_vocab
from gptkit.model.lora import LoRAConfig, apply_lora, mark_trainable
from gptkit.text.tokenizer import ChatTemplate, EOT, IM_END, IM_START, Tokenizer
from gptkit.training.distributed import close_distributed, init_distributed, pick_device, processes
from gptkit.training.loop import autocast_dtype, train
from gptkit.training.preference import DPOLoss, fill_reference
from gptkit.training.resume import resume_checkpoint


def ensure_chat_tokens(model: nn.Module, tokenizer: Tokenizer) -> list[str]:
    """Give the tokenizer the ChatML tokens and a stored template; grow the embedding when the
    vocabulary outgrows it. Returns the tokens that were added. An imported model's own template
    (kind "jinja") is kept with the tokens it already has."""
    if tokenizer.chat_template is not None and tokenizer.chat_template.kind == "jinja":
        return []
    missing = [t for t in (EOT, IM_START, IM_END) if tokenizer.special_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    tokenizer.chat_template = tokenizer.chat_template or ChatTemplate()
    if tokenizer.vocab_size > model.config.vocab_size:
        resize_vocab(model, tokenizer.vocab_size)
    return missing


# ---------------------------------------------------------------------------- losses
def finetune_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """The trainer's loss for a fine-tuning batch of either kind (scaled by the process's share
    of the global batch under torchrun, see TaskBatches)."""
    share = 1.0
    if isinstance(batch[-1], float):
        *batch, share = batch
    if len(batch) == 3:  # (x, last, labels): classification
        x, last, labels = batch
        return F.cross_entropy(class_logits(model, x, last).float(), labels) * share
    x, y = batch
    return model(x, targets=y) * share


# ---------------------------------------------------------------------------- the run
@dataclass
class DataSpec:
    """One task of a run: a training file, its sampling weight, and optionally a val file."""

    path: str
    weight: float = 1.0
    val: str | None = None
    name: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "DataSpec":
        """PATH or PATH@WEIGHT."""
        path, _, weight = spec.rpartition("@") if "@" in spec else (spec, "", "1")
        try:
            return cls(path, float(weight))
        except ValueError:
            raise GptkitError(f"data {spec!r}: weight {weight!r} is not a number (expected PATH or PATH@WEIGHT)") from None


@dataclass
class FinetuneConfig:
    task: str = "auto"  # auto | lm | classify: what the data must be
    method: str = "sft"  # sft (imitate the targets) | dpo (prefer chosen over rejected answers)
    beta: float = 0.1  # DPO: how far the policy may move from the reference
    sft_weight: float = 0.0  # DPO: plus this times the chosen answers' NLL per token (RPO)
    ref: str | None = None  # DPO: the reference checkpoint (default: the base)
    lora: LoRAConfig | None = None  # None: full fine-tuning
    val_fraction: float = 0.05  # of a file's records, when it has no val file
    skip_bad: bool = False
    labels: list[str] = field(default_factory=list)  # default: sorted labels of the data


@dataclass
class Task:
    name: str
    fmt: str
    train: list[Record]
    val: list[Record]
    weight: float
    skipped: int

    @property
    def kind(self) -> str:
        return "classify" if self.fmt == "classify" else "preference" if self.fmt in PREFERENCE else "lm"


def load_tasks(specs: list[DataSpec], ft: FinetuneConfig) -> list[Task]:
    """Read every file; split off validation records (seeded) where no val file is given."""
    tasks, names = [], set()
    for spec in specs:
        fmt, records, skipped = read_records(spec.path, ft.skip_bad)
        if spec.val:
            vfmt, val, vskipped = read_records(spec.val, ft.skip_bad)
            if vfmt != fmt:
                raise GptkitError(f"{spec.val}: a {vfmt} file as validation for the {fmt} file {spec.path}")
            skipped += vskipped
        else:
            records, val = _split(records, ft.val_fraction)
        name = spec.name or Path(spec.path).stem
        while name in names:
            name += "_"
        names.add(name)
        tasks.append(Task(name, fmt, records, val, spec.weight, skipped))
    code = next((t for t in tasks if t.fmt == "code"), None)
    if code is not None:
        raise GptkitError(f"{code.train[0].where}: prompt/tests records are for `gptkit evaluate --task code`; "
                          "train on prompt/completion records")
    kinds = {t.kind for t in tasks}
    if ft.task not in ("auto", "lm", "classify"):
        raise GptkitError(f"--task {ft.task}: expected auto, lm (chat, prompt/completion and text records) or "
                          "classify (text/label records)")
    if ft.task != "auto" and kinds != {ft.task}:
        raise GptkitError(f"--task {ft.task}: the data is {', '.join(f'{t.name} ({t.fmt})' for t in tasks)}")
    if sum(t.kind == "classify" for t in tasks) > 1:
        raise GptkitError("one classification file per run (its labels define the head)")
    _check_method(tasks, ft)
    return tasks


def _check_method(tasks: list[Task], ft: FinetuneConfig) -> None:
    """DPO trains on preference pairs and nothing else; supervised methods on anything but pairs."""
    if ft.method not in ("sft", "dpo"):
        raise GptkitError(f"--method {ft.method}: expected sft (supervised) or dpo (preference pairs)")
    if ft.method == "dpo":
        other = next((t for t in tasks if t.kind != "preference"), None)
        if other is not None:
            raise GptkitError(f"--method dpo: {other.train[0].where.rsplit(':', 1)[0]} holds {other.fmt} records; "
                              'DPO trains on {"prompt", "chosen", "rejected"} pairs')
        if not ft.beta > 0:
            raise GptkitError(f"--beta {ft.beta}: must be positive (0.1 is usual)")
        if not ft.sft_weight >= 0:
            raise GptkitError(f"--sft-weight {ft.sft_weight}: must be 0 (plain DPO) or positive")
    else:
        pairs = next((t for t in tasks if t.kind == "preference"), None)
        if pairs is not None:
            raise GptkitError(f"{pairs.train[0].where.rsplit(':', 1)[0]} holds preference pairs (prompt/chosen/"
                              "rejected): train them with --method dpo")


def _split(records: list[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    if len(records) < 2 or fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(fraction * len(records))))
    return [records[i] for i in sorted(order[n_val:])], [records[i] for i in sorted(order[:n_val])]


def build_batches(tasks: list[Task], tokenizer: Tokenizer, block_size: int, cfg: TrainConfig,
                  labels: list[str], skip_bad: bool, rank: int = 0,
                  world_size: int = 1) -> tuple[TaskBatches | Mixture, dict]:
    """The trainer's data object (one task, or a mixture) and per-task counts; under torchrun
    each process's share of every batch."""
    batches, stats = {}, {}
    for t in tasks:
        if t.kind == "classify":
            train, s = class_examples(t.train, tokenizer, block_size, labels)
            val, vs = class_examples(t.val, tokenizer, block_size, labels)
        elif t.kind == "preference":
            train, s = pair_examples(t.fmt, t.train, tokenizer, block_size)
            val, vs = pair_examples(t.fmt, t.val, tokenizer, block_size)
        else:
            train, s = lm_examples(t.fmt, t.train, tokenizer, block_size, skip_bad)
            val, vs = lm_examples(t.fmt, t.val, tokenizer, block_size, skip_bad)
        stats[t.name] = {"format": t.fmt, "train": len(train), "val": len(val), "weight": t.weight,
                         "skipped": t.skipped + s["skipped"] + vs["skipped"],
                         "truncated": s["truncated"] + vs["truncated"],
                         "first_truncated": s.get("first_truncated") or vs.get("first_truncated")}
        batches[t.name] = TaskBatches(t.kind, train, val, cfg.batch_size, tokenizer.eot_id, seed=cfg.seed,
                                      eval_batches=cfg.eval_batches, rank=rank, world_size=world_size)
    if len(batches) == 1:
        return next(iter(batches.values())), stats
    return Mixture(batches, {t.name: t.weight for t in tasks}, seed=cfg.seed), stats


def prepare_model(base: str | Path, tasks: list[Task], ft: FinetuneConfig) -> tuple[nn.Module, Tokenizer, dict]:
    """Load the base, add chat tokens / a classification head / LoRA as the tasks need;
    returns (model, tokenizer, extra for the checkpoint)."""
    loaded = open_checkpoint(base)
    model, tokenizer = loaded.model, loaded.tokenizer
    extra: dict = {}
    added = ensure_chat_tokens(model, tokenizer) if any(t.fmt in ("chat", "chat_preference") for t in tasks) else []
    if any(t.kind == "classify" for t in tasks):
        labels = ft.labels or _labels(next(t for t in tasks if t.kind == "classify"))
        add_class_head(model, len(labels))
        extra.update(labels=labels, heads={CLASSIFY_HEAD: [model.config.n_embd, len(labels)]})
    if ft.lora is not None:
        if loaded.meta.is_lora:
            raise GptkitError(f"{base}: already a LoRA checkpoint; run `gptkit merge-lora` on it first")
        apply_lora(model, ft.lora)
        extra.update(lora=ft.lora.to_dict(), base=str(Path(base).resolve()))
    extra["added_tokens"] = added
    _freeze_for_lora(model, extra)
    return model.train(), tokenizer, extra


def _freeze_for_lora(model: nn.Module, extra: dict) -> None:
    """With LoRA, train only adapters and heads, plus the embedding when tokens were added
    (their new rows must be learned, so wte is trained and saved too)."""
    if extra.get("lora"):
        mark_trainable(model, also=("heads.", "wte.") if extra["added_tokens"] else ("heads.",))


def _labels(task: Task) -> list[str]:
    return sorted({str(r.data["label"]) for r in task.train + task.val})


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def finetune(base: str | Path, specs: list[DataSpec], cfg: TrainConfig, ft: FinetuneConfig | None = None, *,
             resume: bool | Path = False, log: Callable[[str], None] = print) -> dict:
    """Fine-tune the checkpoint `base` on the data files; the result goes to cfg.out_dir.
    Returns the trainer's last metrics plus a summary of the data and parameters."""

    ft = ft or FinetuneConfig()
    if not specs:
        raise GptkitError("no data files given")
    if ft.lora and cfg.optimizer == "muon":  # adapters and heads are not hidden matrices: all of it is AdamW's
        cfg = dataclasses.replace(cfg, optimizer="adamw")
    dist_info = init_distributed()
    log = log if dist_info.master else (lambda _: None)  # one process speaks for the job
    try:
        tasks = load_tasks(specs, ft)
        torch.manual_seed(cfg.seed)  # new weights (LoRA, heads) the same in every process and every rerun
        model, tokenizer, extra = prepare_model(base, tasks, ft)
        device = pick_device(dist_info)
        data, stats = build_batches(tasks, tokenizer, model.config.block_size, cfg, extra.get("labels", []),
                                    ft.skip_bad, dist_info.rank, dist_info.world_size)
        if ft.method == "dpo":  # from the weights before training (or --ref), so also when resuming
            _score_reference(model.to(device), tokenizer, data, ft, cfg, device, log)
        if resume:  # the run's newest intact checkpoint, with the structure prepare_model just built
            loaded = resume_checkpoint(cfg.out_dir, log)
            model, tokenizer, resume = loaded.model, loaded.tokenizer, loaded.meta.path
            _freeze_for_lora(model, extra)
        model.to(device).train()
        trainable, total = count_params(model)
        summary = {"base": str(base), "tasks": stats, "trainable_params": trainable, "total_params": total,
                   "method": ft.method, "weights": "lora" if ft.lora else "full"}
        if ft.method == "dpo":
            summary.update(beta=ft.beta, sft_weight=ft.sft_weight, ref=ft.ref or str(base))
        extra["finetune"] = summary
        _log_summary(summary, total, trainable, processes(dist_info, cfg, device), log)
        loss_fn = DPOLoss(ft.beta, ft.sft_weight) if ft.method == "dpo" else finetune_loss
        last = train(model, data, cfg, tokenizer, loss_fn=loss_fn, resume=resume, extra=extra,
                     dist_info=dist_info, log=log)
    finally:
        close_distributed(dist_info)
    return {**last, **summary}


def _log_summary(summary: dict, total: int, trainable: int, where: str, log: Callable[[str], None]) -> None:
    log(f"model: {total / 1e6:.2f}M parameters, {where}")
    for name, s in summary["tasks"].items():
        log(f"task {name}: {s['format']}, {s['train']} train / {s['val']} val examples, weight {s['weight']}, "
            f"{s['skipped']} skipped as bad, {s['truncated']} truncated to the context"
            + (f" (the first: {s['first_truncated']}, cut from its start)" if s.get("first_truncated") else ""))
    method = "supervised"
    if summary["method"] == "dpo":
        method = (f"DPO (beta {summary['beta']}" + (f", sft weight {summary['sft_weight']}" if summary["sft_weight"] else "")
                  + f", reference {summary['ref']})")
    log(f"{summary['weights']} {method} fine-tuning: {trainable:,} of {total:,} parameters trained "
        f"({100 * trainable / total:.2f}%)")


def _score_reference(model: nn.Module, tokenizer: Tokenizer, data, ft: FinetuneConfig, cfg: TrainConfig,
                     device: torch.device, log: Callable[[str], None]) -> None:
    """The reference log-probabilities of every pair, from the model before training or from --ref."""
    amp = torch.autocast(device.type, dtype=dt) if (dt := autocast_dtype(cfg, device)) else contextlib.nullcontext()
    ref = model
    if ft.ref:
        loaded = open_checkpoint(ft.ref)
        probe = "Hello, 世界! def f(x): return x + 1"
        if (loaded.model.config.vocab_size != model.config.vocab_size
                or loaded.tokenizer.encode(probe) != tokenizer.encode(probe)):
            raise GptkitError(f"--ref {ft.ref}: its tokenizer or vocabulary differs from the base's; the reference "
                              "must score the same token ids (give a checkpoint of the same family, or leave --ref out)")
        ref = loaded.model.to(device)
    n = fill_reference(ref, data, amp, batch_size=cfg.batch_size)
    log(f"reference log-probabilities of {n} pairs computed ({'--ref ' + ft.ref if ft.ref else 'the base'})")
