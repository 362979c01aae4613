"""Evaluation: perplexity and bits per byte on any text, and task metrics on labelled data.

    perplexity  any text file                        loss, perplexity, bits per byte
    classify    {"text", "label"} .jsonl             accuracy, macro-F1 (head from the checkpoint)
    qa          prompt/completion or chat .jsonl     exact match, token F1
    summarize   prompt/completion or chat .jsonl     ROUGE-L
    translate   prompt/completion or chat .jsonl     BLEU, chrF (sacrebleu; BLEU tokenised for the references'
                                                     language: zh, ja-mecab or 13a, named in the result)
    code        {"prompt", "tests"} .jsonl           pass@1: prompt + completion + tests run in a
                                                     sandboxed subprocess must exit 0

Generation goes through the one engine (greedy). For chat records the prompt is every
message before the last assistant one, rendered with the checkpoint's template; the last
assistant message is the reference.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from gptkit.checkpoint.open import open_checkpoint
from gptkit.config import ANSWER_MAX_TOKENS, SampleConfig
from gptkit.data.records import Record, TaskBatches, class_examples, read_records
from gptkit.device import resolve_device
from gptkit.errors import GptkitError
from gptkit.evaluation.text_metrics import bleu_chrf, bleu_tokenizer, exact_match, rouge_l, token_f1
from gptkit.inference.factory import build_engine
from gptkit.model.heads import class_logits
from gptkit.text.chat import render_chat
from gptkit.text.stream import completion_text

TASKS = ("perplexity", "classify", "qa", "summarize", "translate", "code")
CODE_STOPS = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]  # the completion is one function body


# ---------------------------------------------------------------------------- label metrics
def accuracy_f1(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1 over every label seen in refs or preds, and the majority-class baseline."""
    if not refs:
        raise GptkitError("no examples to score")
    f1s = []
    for label in sorted(set(refs) | set(preds)):
        tp = sum(p == r == label for p, r in zip(preds, refs))
        fp = sum(p == label != r for p, r in zip(preds, refs))
        fn = sum(r == label != p for p, r in zip(preds, refs))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    majority = Counter(refs).most_common(1)[0][1] / len(refs)
    return {"accuracy": sum(p == r for p, r in zip(preds, refs)) / len(refs), "macro_f1": sum(f1s) / len(f1s),
            "majority_baseline": majority}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------- running code
_NO_NETWORK = '''\
import socket as _s
def _blocked(*a, **k):
    raise OSError("network access is disabled during gptkit evaluation")
_s.socket = _s.create_connection = _s.getaddrinfo = _s.socketpair = _blocked
del _s, _blocked
'''


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """`unshare -rn` (a private network namespace with no interfaces) where the kernel allows it."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (exe, "-rn") if ok else ()


def run_python(program: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Run untrusted Python in a subprocess: isolated mode (-I: no user site, no PYTHON* env),
    an empty environment (no proxies), a fresh temp working dir, no network (a network
    namespace where available, and socket functions that raise in any case), a time and a
    memory limit. Returns (exited 0, last lines of stderr or 'timeout')."""
    with tempfile.TemporaryDirectory(prefix="gptkit-exec-") as tmp:
        Path(tmp, "program.py").write_text(_NO_NETWORK + program, encoding="utf-8")
        cmd = [*_netns_prefix(), sys.executable, "-I", "program.py"]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0"}
        try:
            done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)
        except subprocess.TimeoutExpired:
            return False, "timeout"
    return done.returncode == 0, "\n".join(done.stderr.strip().splitlines()[-3:])


def _limit_memory() -> None:
    import resource

    limit = 2 * 2**30  # 2 GiB of address space: enough for tests, not for a runaway program
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ---------------------------------------------------------------------------- model-based measures
@torch.no_grad()
def perplexity(model, tokenizer, text: str) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of the model on text, scored in
    consecutive windows of the model's context (every token after the first is predicted once)."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise GptkitError("text too short: need at least 2 tokens")
    device = next(model.parameters()).device
    T = model.config.block_size
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, T):
        window = torch.tensor([ids[s:s + T + 1]], device=device)  # (1, <= T + 1)
        logits = model(window[:, :-1])  # (1, t, V)
        nll += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
        n += window.shape[1] - 1
    n_bytes = sum(len(tokenizer.token_bytes(i)) for i in ids[1:])
    loss = nll / n
    return {"tokens": n, "bytes": n_bytes, "loss": loss, "perplexity": math.exp(min(loss, 50)),
            "bpb": nll / math.log(2) / max(n_bytes, 1)}


@torch.no_grad()
def classify(model, tokenizer, texts: list[str], labels: list[str], batch_size: int = 32) -> list[str]:
    """Predicted label of each text (the classification head on the last token)."""
    records = [Record(f"text {i}", {"text": t, "label": labels[0]}) for i, t in enumerate(texts)]
    examples, _ = class_examples(records, tokenizer, model.config.block_size, labels)
    batcher = TaskBatches("classify", examples, [], batch_size, tokenizer.eot_id)
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(examples), batch_size):
        x, last, _ = batcher.collate(examples[i:i + batch_size])
        preds += class_logits(model, x.to(device), last.to(device)).argmax(-1).tolist()
    return [labels[p] for p in preds]


def generate_all(model, tokenizer, prompts: list[list[int]], max_tokens: int = ANSWER_MAX_TOKENS,
                 stop: list[str] | None = None, max_batch: int = 32, temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """Completions of many prompts through the engine (continuously batched): greedy, or sampled
    at `temperature` with prompt i seeded by seed + i (reproducible). A prompt too long for the
    context keeps its end. The caller's model is left untouched: the engine gets a copy with any
    LoRA adapters merged (it repacks layers in place)."""

    block = model.config.block_size
    max_tokens = min(max_tokens, block - 1)
    engine = build_engine(model, tokenizer, max_batch=max(1, min(max_batch, len(prompts))), keep_model=True,
                          device=str(next(model.parameters()).device))

    def params(i: int) -> SampleConfig:
        return SampleConfig(max_tokens=max_tokens, temperature=temperature, stop=list(stop or []),
                            seed=None if seed is None else seed + i)

    handles = [engine.submit(p[-(block - max_tokens):], params(i)) for i, p in enumerate(prompts)]
    return [completion_text(tokenizer, h.result()[0]) for h in handles]


def prompt_and_reference(fmt: str, record: dict, tokenizer) -> tuple[list[int], str]:
    """The prompt ids a generation task feeds the model, and the reference answer."""
    if fmt == "completion":
        return tokenizer.encode(record["prompt"]), record["completion"]
    if fmt == "chat":
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return render_chat(tokenizer, messages[:last])[0], messages[last]["content"]
    raise GptkitError(f"a {fmt} file cannot be scored by generation; expected prompt/completion or messages")


# ---------------------------------------------------------------------------- the command
@dataclass
class TaskRun:
    """One task scored on one model: what `gptkit evaluate` reports, plus the per-example
    outcomes so `gptkit compare` can resample the examples (bootstrap)."""

    metrics: dict[str, float]
    examples: list[dict]
    preds: list[str]
    refs: list  # reference answers; for code, whether each program passed its tests

    def resample(self, task: str, idx: list[int]) -> dict[str, float]:
        """The task's metrics on the examples at idx (repeats allowed)."""
        return task_metrics(task, [self.preds[i] for i in idx], [self.refs[i] for i in idx])


def task_metrics(task: str, preds: list[str], refs: list) -> dict[str, float]:
    """The metrics `gptkit evaluate` reports for a task, from predictions and references."""
    if task == "classify":
        return accuracy_f1(preds, refs)
    if task == "code":
        return {"pass@1": mean([float(p) for p in refs])}
    if task == "qa":
        return {"exact_match": mean([exact_match(p, r) for p, r in zip(preds, refs)]),
                "token_f1": mean([token_f1(p, r) for p, r in zip(preds, refs)])}
    if task == "summarize":
        return {"rouge_l": mean([rouge_l(p, r) for p, r in zip(preds, refs)])}
    return bleu_chrf(preds, refs)


def _records(path: str | Path, limit: int | None) -> tuple[str, list]:
    fmt, records, _ = read_records(path)
    return fmt, records[:limit] if limit else records


def run_task(model, tokenizer, cfg: dict, task: str, data: str | Path, *, max_tokens: int = ANSWER_MAX_TOKENS,
             limit: int | None = None, timeout: float = 10.0, log: Callable[[str], None] = lambda m: None) -> TaskRun:
    """Score a loaded model on a task's .jsonl records (every task but perplexity)."""
    fmt, records = _records(data, limit)
    if task == "classify":
        labels = (cfg.get("extra") or {}).get("labels")
        if not labels:
            raise GptkitError(f"{cfg.get('_path', 'checkpoint')}: no classification head "
                              "(fine-tune with {\"text\", \"label\"} data first)")
        if fmt != "classify":
            raise GptkitError(f"{data}: a {fmt} file; --task classify needs {{\"text\", \"label\"}} records")
        preds = classify(model, tokenizer, [r.data["text"] for r in records], labels)
        refs = [str(r.data["label"]) for r in records]
        return TaskRun(task_metrics(task, preds, refs), _examples(records, preds, refs), preds, refs)
    if task == "code":
        return _code(model, tokenizer, fmt, records, data, max_tokens, timeout, log)
    pairs = [prompt_and_reference(fmt, r.data, tokenizer) for r in records]
    preds = generate_all(model, tokenizer, [p for p, _ in pairs], max_tokens)
    refs = [r for _, r in pairs]
    return TaskRun(task_metrics(task, preds, refs), _examples(records, preds, refs), preds, refs)


def evaluate(ckpt: str | Path, task: str, data: str | Path, *, max_tokens: int = ANSWER_MAX_TOKENS,
             limit: int | None = None, timeout: float = 10.0, log: Callable[[str], None] = lambda m: None) -> dict:
    """Score the checkpoint on one task's data; returns {"task", "data", "n", metrics..., "examples"}."""

    if task not in TASKS:
        raise GptkitError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    loaded = open_checkpoint(ckpt, device=resolve_device())
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, {"step": loaded.meta.step, "extra": loaded.meta.extra}
    out: dict = {"task": task, "checkpoint": str(ckpt), "data": str(data)}
    if task == "perplexity":
        return {**out, **perplexity_of_file(model, tokenizer, data)}
    run = run_task(model, tokenizer, {**cfg, "_path": str(ckpt)}, task, data, max_tokens=max_tokens, limit=limit,
                   timeout=timeout, log=log)
    if task == "translate":
        out["bleu_tokenize"] = bleu_tokenizer(run.refs)
    return {**out, "n": len(run.preds), **run.metrics, "examples": run.examples}


def perplexity_of_file(model, tokenizer, path: str | Path) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path}: text file not found")
    return perplexity(model, tokenizer, path.read_text(encoding="utf-8"))


def _code(model, tokenizer, fmt: str, records: list, data, max_tokens: int, timeout: float, log) -> TaskRun:
    if fmt != "code":
        raise GptkitError(f"{data}: a {fmt} file; --task code needs {{\"prompt\", \"tests\"}} records")
    preds = generate_all(model, tokenizer, [tokenizer.encode(r.data["prompt"]) for r in records], max_tokens,
                         stop=CODE_STOPS)
    passed = []
    for r, completion in zip(records, preds):
        ok, err = run_python(r.data["prompt"] + completion + "\n\n" + r.data["tests"] + "\n", timeout)
        passed.append(ok)
        log(f"{r.where}: " + ("pass" if ok else f"fail ({err.splitlines()[-1] if err else 'exit code'})"))
    examples = [{"where": r.where, "completion": c, "passed": p} for r, c, p in zip(records[:5], preds, passed)]
    return TaskRun(task_metrics("code", preds, passed), examples, preds, passed)


def _examples(records: list, preds: list[str], refs: list[str], n: int = 5) -> list[dict]:
    return [{"where": r.where, "prediction": p, "reference": ref} for r, p, ref in zip(records[:n], preds, refs)]


def format_table(result: dict) -> str:
    """The numeric results as a two-column table for the terminal."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows) if rows else 0
    head = f"{result.get('task', '')} on {result.get('data', '')}"
    return "\n".join([head, "-" * max(len(head), width + 12)] + [f"{k:<{width}}  {v:>10}" for k, v in rows])
