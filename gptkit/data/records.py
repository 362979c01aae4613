"""Fine-tuning data: the files users already have -> validated records -> examples -> batches.

Formats (detected per file from the first record; every record of a file must match it):
    chat        .jsonl  {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}, and (OpenAI's
                        function-calling format) "tools": [...], assistant "tool_calls", role "tool" results
    completion  .jsonl  {"prompt": "...", "completion": "..."}          (OpenAI's legacy format)
    classify    .jsonl  {"text": "...", "label": "..." | int}
    text        .jsonl  {"text": "..."}   or any other file: plain text (continued pretraining)
    code        .jsonl  {"prompt": "...", "tests": "..."}                (evaluation only: pass@1)
    preference  .jsonl  {"prompt": "...", "chosen": "...", "rejected": "..."}   (DPO; TRL's format)
    chat_preference     the same with "prompt" a list of messages and each answer an assistant
                        message (or a list of one, as TRL writes it)

Language-model examples learn only their targets: assistant tokens (ChatML, rendered by
`render_chat`, the function chat and the server use), the completion, or every token of
plain text. Examples are right-padded per batch with targets of -100: attention is causal,
so a real token never sees the padding after it and the loss never counts it. `TaskBatches`
and `Mixture` are batch sources for the trainer, beside pretraining's `TokenShards`
(gptkit.data.shards), with the same interface and the same split of each global batch by rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptkit.errors import GptkitError
from gptkit.text.tokenizer import Tokenizer
from gptkit.text.chat import render_chat

FORMATS = ("chat", "completion", "classify", "text", "code", "preference", "chat_preference")
PREFERENCE = ("preference", "chat_preference")


# ---------------------------------------------------------------------------- reading records
@dataclass
class Record:
    """One validated record and where it came from, for error messages."""

    where: str  # "file:line"
    data: dict


def detect_format(record: dict) -> str:
    if "chosen" in record or "rejected" in record:
        return "chat_preference" if isinstance(record.get("prompt"), list) else "preference"
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
                      "text/label, text, prompt/tests or prompt/chosen/rejected")


def _check_chat(r: dict) -> None:
    _check_messages(r["messages"], "messages")
    if not any(m["role"] == "assistant" for m in r["messages"]):
        raise GptkitError("no assistant message to learn from")


def _check_messages(messages, name: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise GptkitError(f"{name!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            role = m.get("role") if isinstance(m, dict) else m
            raise GptkitError(f"{name}[{i}]: role {role!r}; expected system, user, assistant or tool")
        calls = m.get("tool_calls")
        if calls is not None:
            _check_tool_calls(calls, f"{name}[{i}].tool_calls", m["role"])
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise GptkitError(f"{name}[{i}]: 'content' must be a string")


def _check_tool_calls(calls, name: str, role: str) -> None:
    """OpenAI's shape: [{"type": "function", "function": {"name": str, "arguments": JSON object text}}]."""
    if role != "assistant" or not isinstance(calls, list) or not calls:
        raise GptkitError(f"{name}: expected a non-empty list, on an assistant message")
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        args = f.get("arguments") if isinstance(f, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(args, (str, dict)):
            raise GptkitError(f"{name}[{j}]: expected {{\"function\": {{\"name\": \"...\", \"arguments\": \"{{...}}\"}}}}")
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError:
                raise GptkitError(f"{name}[{j}].function.arguments: not JSON: {args[:60]!r}") from None


def answer_message(answer) -> dict:
    """A chat pair's answer as one assistant message: {"role": "assistant", ...} or TRL's list of one."""
    return answer[0] if isinstance(answer, list) and len(answer) == 1 else answer


def _check_pair(r: dict, chat: bool) -> None:
    """prompt/chosen/rejected: strings, or (chat) messages and one assistant message per answer."""
    for name in ("prompt", "chosen", "rejected"):
        if name not in r:
            raise GptkitError(f"missing field {name!r} (a preference pair is prompt, chosen and rejected)")
    if not chat:
        _check_fields(r, {"prompt": (str,), "chosen": (str,), "rejected": (str,)})
    else:
        _check_messages(r["prompt"], "prompt")
        for name in ("chosen", "rejected"):
            m = answer_message(r[name])
            if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str):
                raise GptkitError(f"field {name!r} must be one assistant message {{\"role\": \"assistant\", "
                                  f"\"content\": \"...\"}} (the prompt is a list of messages), got {r[name]!r}")
    if answer_message(r["chosen"]) == answer_message(r["rejected"]):  # TRL's list of one is the message
        raise GptkitError("field 'rejected' is identical to 'chosen': a pair needs two different answers")


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
    "preference": lambda r: _check_pair(r, chat=False),
    "chat_preference": lambda r: _check_pair(r, chat=True),
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
            r = parse_object(line)
            fmt = fmt or detect_format(r)
            if detect_format(r) != fmt:
                if {fmt, detect_format(r)} == set(PREFERENCE):
                    raise GptkitError(f"field 'prompt' is {'a list of messages' if fmt == 'preference' else 'a string'}"
                                      f" but the file's first pair has {'a string' if fmt == 'preference' else 'messages'}"
                                      "; a file holds chat pairs or plain pairs, not both")
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


def parse_object(line: str) -> dict:
    """One .jsonl line as a JSON object (a GptkitError without the location otherwise)."""
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
    if fmt == "chat":  # OpenAI's fine-tuning format for function calling adds "tools" beside the messages
        return render_chat(tokenizer, r["messages"], add_generation_prompt=False, tools=r.get("tools"))
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

    A batch is (x, y) for a language-model task, as `lm_loss` takes it, (x, last, labels)
    for classification, or (x, y, ref) for preference pairs (gptkit.data.pairs): x (B, T)
    right-padded with `pad_id`, y (B, T) with -100 on padding, last (B,) the index of each
    row's last real token; a pair batch holds 2B rows, the B chosen answers then the B
    rejected ones, and ref (2B,) their reference log-probabilities. x comes first, as the
    trainer expects.

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

    def collate(self, examples: list) -> tuple:
        if self.kind == "preference":  # every pair's chosen row, then every rejected row: one forward for both
            x, y = self.pad_rows([e.chosen for e in examples] + [e.rejected for e in examples])
            ref = torch.tensor([e.ref[0] for e in examples] + [e.ref[1] for e in examples])  # (2B,)
            return x, y, ref
        x, y = self.pad_rows(examples)
        if self.kind == "classify":
            last = torch.tensor([len(e.ids) - 1 for e in examples])  # (B,)
            return x, last, torch.tensor([e.label for e in examples])
        return x, y

    def pad_rows(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = max(len(e.ids) for e in examples)
        x = torch.tensor([e.ids + [self.pad_id] * (T - len(e.ids)) for e in examples])  # (B, T)
        if examples[0].targets is None:
            return x, None
        return x, torch.tensor([e.targets + [-100] * (T - len(e.targets)) for e in examples])  # (B, T)

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

    def _weight(self, e) -> int:
        """What a batch's mean loss averages over: target tokens, or one label or pair per row."""
        return sum(t != -100 for t in e.targets) if self.kind == "lm" else 1

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
