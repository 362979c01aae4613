"""Fine-tuning: the data formats users already have -> padded batches -> the one trainer.

Formats (detected per file from the first record; every record of a file must match it):
    chat        .jsonl  {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
    completion  .jsonl  {"prompt": "...", "completion": "..."}          (OpenAI's legacy format)
    classify    .jsonl  {"text": "...", "label": "..." | int}
    text        .jsonl  {"text": "..."}   or any other file: plain text (continued pretraining)
    code        .jsonl  {"prompt": "...", "tests": "..."}                (evaluation only: pass@1)

Language-model tasks learn only their targets: assistant tokens (ChatML, rendered by
`render_chat`, the function chat and the server use), the completion, or every token of
plain text. Classification puts a Linear head (`model.heads["classify"]`) on the hidden
state of the last real token. Examples are right-padded per batch with targets of -100:
attention is causal, so a real token never sees the padding after it and the loss never
counts it. Several files make a multi-task mixture sampled with weights, with one
validation loss per task (`val_loss/<task>`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.checkpoint import attach_heads, load_model
from gptkit.config import GptkitError, TrainConfig
from gptkit.lora import LoRAConfig, apply_lora, mark_trainable
from gptkit.tokenizer import EOT, IM_END, IM_START, ChatTemplate, Tokenizer, load_tokenizer, render_chat

FORMATS = ("chat", "completion", "classify", "text", "code")
CLASSIFY_HEAD = "classify"


# ---------------------------------------------------------------------------- reading records
@dataclass
class Record:
    """One validated record and where it came from, for error messages."""

    where: str  # "file:line"
    data: dict


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "tests" in record:
        return "code"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "label" in record:
        return "classify"
    if "text" in record:
        return "text"
    raise GptkitError(f"unknown record with fields {sorted(record)}; expected messages, prompt/completion, "
                      "text/label, text or prompt/tests")


def _check_chat(r: dict) -> None:
    messages = r["messages"]
    if not isinstance(messages, list) or not messages:
        raise GptkitError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else m
            raise GptkitError(f"messages[{i}]: role {role!r}; expected system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise GptkitError(f"messages[{i}]: 'content' must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise GptkitError("no assistant message to learn from")


def _check_fields(r: dict, fields: dict[str, tuple[type, ...]]) -> None:
    for name, types in fields.items():
        if name not in r:
            raise GptkitError(f"missing field {name!r}")
        if not isinstance(r[name], types) or isinstance(r[name], bool):
            raise GptkitError(f"field {name!r} must be {' or '.join(t.__name__ for t in types)}, got {r[name]!r}")


CHECKS: dict[str, Callable[[dict], None]] = {
    "chat": _check_chat,
    "completion": lambda r: _check_fields(r, {"prompt": (str,), "completion": (str,)}),
    "classify": lambda r: _check_fields(r, {"text": (str,), "label": (str, int)}),
    "text": lambda r: _check_fields(r, {"text": (str,)}),
    "code": lambda r: _check_fields(r, {"prompt": (str,), "tests": (str,)}),
}


def read_records(path: str | Path, skip_bad: bool = False) -> tuple[str, list[Record], int]:
    """(format, records, skipped) from a .jsonl file, or one text record for any other file.
    A bad record raises GptkitError naming file:line, unless skip_bad (then it is counted)."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix != ".jsonl":
        return "text", [Record(f"{path}:1", {"text": text})], 0
    fmt, records, skipped = None, [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = _parse(line)
            fmt = fmt or detect_format(r)
            if detect_format(r) != fmt:
                raise GptkitError(f"a {detect_format(r)} record in a {fmt} file")
            CHECKS[fmt](r)
        except GptkitError as e:
            if not skip_bad:
                raise GptkitError(f"{path}:{lineno}: {e}") from None
            skipped += 1
            continue
        records.append(Record(f"{path}:{lineno}", r))
    if not records:
        raise GptkitError(f"{path}: no usable records" + (f" ({skipped} skipped as bad)" if skipped else ""))
    return fmt, records, skipped


def _parse(line: str) -> dict:
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptkitError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(r, dict):
        raise GptkitError(f"expected a JSON object, got {type(r).__name__}")
    return r


# ---------------------------------------------------------------------------- records -> examples
@dataclass
class Example:
    ids: list[int]
    targets: list[int] | None = None  # LM: ids[i + 1] or -100, one per input position
    label: int | None = None  # classification


def lm_example(ids: list[int], mask: list[int]) -> Example:
    """Inputs ids[:-1], targets ids[1:] where mask says the token is learned, else -100."""
    return Example(ids[:-1], [t if m else -100 for t, m in zip(ids[1:], mask[1:])])


def encode_lm(fmt: str, r: dict, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask) of one LM record; mask[i] = 1 where token i is a target."""
    if fmt == "chat":
        return render_chat(tokenizer, r["messages"], add_generation_prompt=False)
    if fmt == "completion":
        prompt, answer = tokenizer.encode(r["prompt"]), tokenizer.encode(r["completion"]) + [tokenizer.eot_id]
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)
    ids = tokenizer.encode(r["text"]) + [tokenizer.eot_id]
    return ids, [1] * len(ids)


def lm_examples(fmt: str, records: list[Record], tokenizer: Tokenizer, block_size: int,
                skip_bad: bool) -> tuple[list[Example], dict]:
    """Examples of at most block_size inputs: long plain text is cut into windows, a long
    prompt/chat is truncated at the end (counted), one whose targets all fall off is bad."""
    out, stats = [], {"truncated": 0, "skipped": 0}
    for rec in records:
        ids, mask = encode_lm(fmt, rec.data, tokenizer)
        if fmt == "text":
            step = block_size  # windows overlap by one token so every token is a target once
            out += [lm_example(ids[s:s + block_size + 1], mask[s:s + block_size + 1])
                    for s in range(0, max(1, len(ids) - 1), step)]
            continue
        if len(ids) > block_size + 1:
            stats["truncated"] += 1
            ids, mask = ids[:block_size + 1], mask[:block_size + 1]
        ex = lm_example(ids, mask)
        if all(t == -100 for t in ex.targets):
            if not skip_bad:
                raise GptkitError(f"{rec.where}: no target token within the context of {block_size} tokens "
                                  f"(the record has {len(encode_lm(fmt, rec.data, tokenizer)[0])}); shorten it")
            stats["skipped"] += 1
            continue
        out.append(ex)
    return [e for e in out if e.ids], stats


def class_examples(records: list[Record], tokenizer: Tokenizer, block_size: int,
                   labels: list[str]) -> tuple[list[Example], dict]:
    """Texts cut to block_size tokens (counted), labels as indices into `labels`."""
    out, stats = [], {"truncated": 0, "skipped": 0}
    index = {name: i for i, name in enumerate(labels)}
    for rec in records:
        ids = tokenizer.encode(rec.data["text"]) or [tokenizer.eot_id]
        if len(ids) > block_size:
            stats["truncated"] += 1
            ids = ids[:block_size]
        label = str(rec.data["label"])
        if label not in index:
            raise GptkitError(f"{rec.where}: label {label!r} is not one of the model's labels {labels}")
        out.append(Example(ids, label=index[label]))
    return out, stats


# ---------------------------------------------------------------------------- batches
class TaskBatches:
    """Random training batches and fixed validation batches of one task's examples.

    A batch is (x, y) for a language-model task, as `lm_loss` takes it, or (x, last, labels)
    for classification: x (B, T) right-padded with `pad_id`, y (B, T) with -100 on padding,
    last (B,) the index of each row's last real token. x comes first, as the trainer expects.

    Under torchrun, as `TokenShards`, every process draws the same global batch of
    batch_size x world_size examples and keeps its slice, followed by its share: the float
    world_size x (its targets / the global batch's targets) that `finetune_loss` scales its mean
    loss by, so the processes' average (what DDP averages gradients of) is the global batch's
    mean even when the slices hold different numbers of target tokens.
    """

    def __init__(self, kind: str, train: list[Example], val: list[Example], batch_size: int, pad_id: int, *,
                 seed: int = 1337, eval_batches: int = 20, rank: int = 0, world_size: int = 1):
        if not train:
            raise GptkitError("no training examples")
        self.kind, self.train, self.val = kind, train, val
        self.batch_size, self.pad_id, self.eval_batches = batch_size, pad_id, eval_batches
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def collate(self, examples: list[Example]) -> tuple:
        T = max(len(e.ids) for e in examples)
        x = torch.tensor([e.ids + [self.pad_id] * (T - len(e.ids)) for e in examples])  # (B, T)
        if self.kind == "classify":
            last = torch.tensor([len(e.ids) - 1 for e in examples])  # (B,)
            return x, last, torch.tensor([e.label for e in examples])
        y = torch.tensor([e.targets + [-100] * (T - len(e.targets)) for e in examples])  # (B, T)
        return x, y

    def train_batch(self) -> tuple:
        idx = torch.randint(len(self.train), (self.batch_size * self.world_size,), generator=self.generator).tolist()
        return self._mine([self.train[i] for i in idx])

    def val_batches(self) -> list[tuple]:
        B = self.batch_size * self.world_size
        return [self._mine(self.val[i:i + B]) for i in range(0, len(self.val), B)][:self.eval_batches]

    def _mine(self, examples: list[Example]) -> tuple:
        """This process's slice of a global batch (the whole batch in a single process)."""
        if self.world_size == 1:
            return self.collate(examples)
        per = -(-len(examples) // self.world_size)  # a short last validation batch leaves late ranks less
        mine = examples[self.rank * per:(self.rank + 1) * per]
        share = self.world_size * sum(map(self._weight, mine)) / sum(map(self._weight, examples))
        if not mine:  # nothing left for this process: a stand-in row that counts for nothing
            mine, share = examples[:1], 0.0
        return (*self.collate(mine), share)

    def _weight(self, e: Example) -> int:
        """What a batch's mean loss averages over: target tokens, or one label per row."""
        return 1 if self.kind == "classify" else sum(t != -100 for t in e.targets)

    def val_sets(self) -> dict[str, list]:
        return {"val": self.val_batches()} if self.val else {}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class Mixture:
    """Several tasks in one run: each training batch comes from one task, drawn with the
    given weights; validation reports one loss per task."""

    def __init__(self, tasks: dict[str, TaskBatches], weights: dict[str, float], seed: int = 1337):
        bad = {n: w for n, w in weights.items() if not w > 0}
        if bad:
            raise GptkitError(f"task weights must be positive: {bad}")
        self.tasks, self.names = tasks, list(tasks)
        self.weights = torch.tensor([float(weights[n]) for n in self.names])
        self.generator = torch.Generator().manual_seed(seed + 1)

    def train_batch(self) -> tuple:
        i = torch.multinomial(self.weights, 1, generator=self.generator).item()
        return self.tasks[self.names[i]].train_batch()

    def val_sets(self) -> dict[str, list]:
        return {n: b for n, t in self.tasks.items() if (b := t.val_batches())}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "tasks": {n: t.state_dict() for n, t in self.tasks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        for n, t in self.tasks.items():
            t.load_state_dict(state["tasks"][n])


# ---------------------------------------------------------------------------- losses
def class_logits(model: nn.Module, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Classification logits (B, n_labels) from the hidden state of each row's last real token."""
    return model(x, head=CLASSIFY_HEAD, last=last)


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


# ---------------------------------------------------------------------------- model set-up
def ensure_chat_tokens(model: nn.Module, tokenizer: Tokenizer) -> list[str]:
    """Give the tokenizer the ChatML tokens and a stored template; grow the embedding when the
    vocabulary outgrows it. Returns the tokens that were added."""
    missing = [t for t in (EOT, IM_START, IM_END) if tokenizer.special_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    tokenizer.chat_template = tokenizer.chat_template or ChatTemplate()
    if tokenizer.vocab_size > model.config.vocab_size:
        resize_vocab(model, tokenizer.vocab_size)
    return missing


@torch.no_grad()
def resize_vocab(model: nn.Module, vocab_size: int) -> None:
    """Grow wte to vocab_size rows (new rows = the mean embedding, a neutral start) and keep
    the LM head tied to it."""
    old = model.wte.weight
    wte = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    wte.weight[:old.shape[0]] = old
    wte.weight[old.shape[0]:] = old.mean(dim=0)
    model.wte = wte
    model.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
    model.lm_head.weight = model.wte.weight
    model.config.vocab_size = vocab_size


def add_class_head(model: nn.Module, n_labels: int) -> None:
    attach_heads(model, {CLASSIFY_HEAD: [model.config.n_embd, n_labels]})
    head = model.heads[CLASSIFY_HEAD].to(model.wte.weight.device)
    nn.init.normal_(head.weight, std=0.02)  # as every other Linear (GPT.init_weights)
    nn.init.zeros_(head.bias)


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
        return "classify" if self.fmt == "classify" else "lm"


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
    if ft.task != "auto" and kinds != {ft.task}:
        raise GptkitError(f"--task {ft.task}: the data is {', '.join(f'{t.name} ({t.fmt})' for t in tasks)}")
    if sum(t.kind == "classify" for t in tasks) > 1:
        raise GptkitError("one classification file per run (its labels define the head)")
    return tasks


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
        else:
            train, s = lm_examples(t.fmt, t.train, tokenizer, block_size, skip_bad)
            val, vs = lm_examples(t.fmt, t.val, tokenizer, block_size, skip_bad)
        stats[t.name] = {"format": t.fmt, "train": len(train), "val": len(val), "weight": t.weight,
                         "skipped": t.skipped + s["skipped"] + vs["skipped"],
                         "truncated": s["truncated"] + vs["truncated"]}
        batches[t.name] = TaskBatches(t.kind, train, val, cfg.batch_size, tokenizer.eot_id, seed=cfg.seed,
                                      eval_batches=cfg.eval_batches, rank=rank, world_size=world_size)
    if len(batches) == 1:
        return next(iter(batches.values())), stats
    return Mixture(batches, {t.name: t.weight for t in tasks}, seed=cfg.seed), stats


def prepare_model(base: str | Path, tasks: list[Task], ft: FinetuneConfig) -> tuple[nn.Module, Tokenizer, dict]:
    """Load the base, add chat tokens / a classification head / LoRA as the tasks need;
    returns (model, tokenizer, extra for the checkpoint)."""
    model, base_cfg = load_model(base)
    tokenizer = load_tokenizer(base)
    extra: dict = {}
    added = ensure_chat_tokens(model, tokenizer) if any(t.fmt == "chat" for t in tasks) else []
    if any(t.kind == "classify" for t in tasks):
        labels = ft.labels or _labels(next(t for t in tasks if t.kind == "classify"))
        add_class_head(model, len(labels))
        extra.update(labels=labels, heads={CLASSIFY_HEAD: [model.config.n_embd, len(labels)]})
    if ft.lora is not None:
        if base_cfg.get("extra", {}).get("lora"):
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
             resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Fine-tune the checkpoint `base` on the data files; the result goes to cfg.out_dir.
    Returns the trainer's last metrics plus a summary of the data and parameters."""
    from gptkit.parallel import close_distributed, init_distributed, pick_device, processes
    from gptkit.train import train

    ft = ft or FinetuneConfig()
    if not specs:
        raise GptkitError("no data files given")
    dist_info = init_distributed()
    log = log if dist_info.master else (lambda _: None)  # one process speaks for the job
    try:
        tasks = load_tasks(specs, ft)
        torch.manual_seed(cfg.seed)  # new weights (LoRA, heads) the same in every process and every rerun
        model, tokenizer, extra = prepare_model(base, tasks, ft)
        if resume:  # the run's own checkpoint, with the structure prepare_model just built
            model, _ = load_model(cfg.out_dir)
            _freeze_for_lora(model, extra)
            tokenizer = load_tokenizer(cfg.out_dir)
        device = pick_device(dist_info)
        model.to(device).train()
        data, stats = build_batches(tasks, tokenizer, model.config.block_size, cfg, extra.get("labels", []),
                                    ft.skip_bad, dist_info.rank, dist_info.world_size)
        trainable, total = count_params(model)
        summary = {"base": str(base), "tasks": stats, "trainable_params": trainable, "total_params": total,
                   "method": "lora" if ft.lora else "full"}
        extra["finetune"] = summary
        log(f"model: {total / 1e6:.2f}M parameters, {processes(dist_info, cfg, device)}")
        for name, s in stats.items():
            log(f"task {name}: {s['format']}, {s['train']} train / {s['val']} val examples, weight {s['weight']}, "
                f"{s['skipped']} skipped as bad, {s['truncated']} truncated to the context")
        log(f"{summary['method']} fine-tuning: {trainable:,} of {total:,} parameters trained "
            f"({100 * trainable / total:.2f}%)")
        last = train(model, data, cfg, tokenizer, loss_fn=finetune_loss, resume=resume, extra=extra,
                     dist_info=dist_info, log=log)
    finally:
        close_distributed(dist_info)
    return {**last, **summary}
