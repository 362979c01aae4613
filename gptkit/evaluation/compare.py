"""`gptkit compare A B [C...]`: the same evaluation on several checkpoints, side by side.

For each model, in one run on this machine:
    size    parameters, forward FLOPs per token, bytes of weights as loaded, KV cache per token
    speed   prefill and decode tokens/s through the engine (models alternate over rounds, best
            round counts, so load from other processes hits them alike)
    text    loss, perplexity and bits per byte on the same text (evaluate.perplexity)
    task    the metrics of `gptkit evaluate` on a task file, each with a bootstrap 95% interval
            over examples, and the paired-bootstrap difference from the first model; every
            example's reference and answers in OUT/predictions.jsonl, the first ones where the
            models disagree in the report
    prompts greedy and sampled (seeded) answers to the same prompts

Bits per byte is the one text measure comparable across tokenizers (loss and perplexity are
per token). A prepared folder holds token ids of one tokenizer, so its val split is decoded
back to text first (with a model whose tokenizer matches meta.json, checked by the byte count)
and every model scores that text; the text is saved as OUT/data.txt, so
`gptkit evaluate CKPT --task perplexity --data OUT/data.txt` reproduces the figures.

A model is a checkpoint folder, a Hugging Face GPT-2 folder (imported into OUT/imported/),
or either with `@int8` appended (weight-only int8, as `generate --quantize int8`); NAME=
in front names it in the report (default: the folder's name).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptkit.checkpoint.hf import import_hf
from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.config import ANSWER_MAX_TOKENS, ModelConfig, SampleConfig
from gptkit.data.records import read_records
from gptkit.data.shards import split_shards
from gptkit.device import device_name, resolve_device, synchronize
from gptkit.fileio import atomic_write_text
from gptkit.errors import GptkitError
from gptkit.evaluation.bootstrap import paired
from gptkit.evaluation.compare_report import write_report
from gptkit.evaluation.evaluate import generate_all, perplexity, run_task
from gptkit.evaluation.text_metrics import bleu_tokenizer
from gptkit.inference.factory import build_engine
from gptkit.model.lora import merge_lora
from gptkit.model.quantize import quantize_model
from gptkit.model.size import model_stats
from gptkit.training.finetune import ensure_chat_tokens

Log = Callable[[str], None]
AUTO_TASK = {"completion": "qa", "chat": "qa", "classify": "classify", "code": "code"}


@dataclass
class ModelSpec:
    label: str
    path: Path
    quantize: str | None = None


@dataclass
class CompareConfig:
    data: Path | None = None  # raw text file or prepared folder
    tasks: Path | None = None  # .jsonl in an `evaluate` format
    task: str = "auto"  # qa | summarize | translate | classify | code; auto: from the file's format
    prompts: Path | None = None  # one prompt per line
    out: Path = Path("report")
    max_tokens: int = ANSWER_MAX_TOKENS  # longest task answer
    answer_tokens: int = 48  # longest answer to a prompt
    limit: int | None = None  # first N task records
    temperature: float = 0.8  # for the sampled answers
    bootstrap: int = 1000
    speed_rounds: int = 2
    seed: int = 0
    timeout: float = 10.0


@dataclass
class ModelResult:
    label: str
    path: str
    quantize: str | None
    size: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    task: dict = field(default_factory=dict)  # metric -> {value, lo, hi}
    diff: dict = field(default_factory=dict)  # metric -> {value, lo, hi}, vs the first model
    answers: list = field(default_factory=list)  # [{prompt, greedy, sampled}]
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------------------- models
def parse_specs(args: list[str]) -> list[ModelSpec]:
    specs = []
    for arg in args:
        name, path, quantize = None, arg, None
        if "=" in path and not Path(path).exists():  # NAME=CKPT, as `serve --model`
            name, _, path = path.partition("=")
        if "@" in path and not Path(path).exists():
            path, _, quantize = path.rpartition("@")
            if quantize != "int8":
                raise GptkitError(f"{arg}: expected [NAME=]CKPT or [NAME=]CKPT@int8")
        label = name or Path(path).name + (f"@{quantize}" if quantize else "")
        specs.append(ModelSpec(label, Path(path), quantize))
    seen: dict[str, int] = {}
    for s in specs:  # the same model twice (a self-comparison) still needs two names
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label += f"#{seen[s.label]}"
    return specs


def resolve(spec: ModelSpec, out: Path, log: Log) -> Path:
    """The checkpoint folder of a spec; a Hugging Face folder is imported into OUT/imported/ once."""
    config = spec.path / "config.json"
    if config.is_file() and "model" not in json.loads(config.read_text(encoding="utf-8")):

        target = out / "imported" / spec.path.name
        if not (target / "config.json").is_file():
            log(f"importing Hugging Face model {spec.path} -> {target}")
            import_hf(spec.path, target)
        return target
    return spec.path


def load(spec: ModelSpec, out: Path, log: Log):
    """(model, tokenizer, config dict) for a spec, quantised when it asks for it."""
    path = resolve(spec, out, log)
    ckpt = open_checkpoint(path)
    model = ckpt.model
    if spec.quantize:
        merge_lora(model)
        quantize_model(model, spec.quantize)
    return model, ckpt.tokenizer, {"model": ckpt.meta.model.to_dict(), "step": ckpt.meta.step,
                                   "extra": ckpt.meta.extra, "_path": str(path)}


def size_of(model, cfg: dict) -> dict:
    mc = ModelConfig.from_dict(cfg["model"])
    stats = model_stats(mc)
    tensors = list(model.parameters()) + list(model.buffers())
    return {"params": stats["params"], "forward_flops_per_token": stats["forward_flops_per_token"],
            "weights_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "kv_bytes_per_token": 2 * mc.n_layer * mc.n_embd * 4, "context": mc.block_size}


# ---------------------------------------------------------------------------- text
def text_for(data: Path, tokenizers: list, out: Path) -> tuple[str, str]:
    """(text every model scores, where it came from); a prepared folder's val split is decoded."""
    if data.is_file():
        return data.read_text(encoding="utf-8"), str(data)
    if not data.is_dir():
        raise GptkitError(f"--data {data}: no such text file or prepared folder")

    meta, shards = split_shards(data, "val")
    tok = next((t for t in tokenizers if t.vocab_size == meta["vocab_size"] and t.eot_id == meta.get("eot_id")), None)
    expected = (meta.get("text_bytes") or {}).get("val")
    text = _decode_split(tok, shards, meta.get("eot_id")) if tok else ""
    if tok is None or (expected is not None and len(text.encode("utf-8")) != expected):
        raise GptkitError(f"{data}: prepared with a tokenizer none of the models has (vocab {meta['vocab_size']}); "
                          "its token ids mean nothing to them: pass the raw text file as --data instead")
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.txt").write_text(text, encoding="utf-8")
    return text, f"{data} (val split decoded to {out / 'data.txt'})"


def _decode_split(tok, shards: list, eot: int | None) -> str:
    docs, cur = [], []
    for shard in shards:
        for i in shard.tolist():
            if i == eot:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
    if cur:
        docs.append(tok.decode(cur))
    return "".join(docs)


# ---------------------------------------------------------------------------- speed
def _best_time(fn, device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)


def measure_speed(model, tokenizer) -> dict[str, float]:
    """Prefill tokens/s (one prompt of up to 256 tokens) and decode tokens/s at batch 1 (up to 64
    new tokens, greedy; the first new token, which includes the prefill, is timed apart)."""
    # no end-of-text ids: every timed request generates exactly the tokens asked for
    engine = build_engine(model, tokenizer, max_batch=1, keep_model=True, stop_at_eos=False)
    T = model.config.block_size
    rng = random.Random(0)
    long = [rng.randrange(tokenizer.vocab_size) for _ in range(min(256, T - 1))]
    short, new = long[:8], max(2, min(64, T - 9))

    def run(prompt: list[int], n: int) -> None:
        engine.generate(prompt, SampleConfig(max_tokens=n, temperature=0.0))

    prefill = len(long) / _best_time(lambda: run(long, 1), engine.device)
    first = _best_time(lambda: run(short, 1), engine.device)
    full = _best_time(lambda: run(short, new), engine.device)
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": (new - 1) / max(full - first, 1e-9),
            "prefill_tokens": len(long), "decode_tokens": new}


# ---------------------------------------------------------------------------- the command
def compare(args: list[str], cfg: CompareConfig, log: Log = lambda m: None) -> dict:
    """Evaluate every model alike, write cfg.out/{index.html, report.md, results.json, *.png};
    returns the results dict."""
    if len(args) < 1:
        raise GptkitError("give at least one checkpoint")
    specs = parse_specs(args)
    task, fmt = _task_name(cfg)
    prompts = _prompts(cfg.prompts)
    results = [ModelResult(s.label, str(s.path), s.quantize) for s in specs]
    runs, text, source = [], None, None
    for spec, res in zip(specs, results):
        model, tokenizer, mcfg = load(spec, cfg.out, log)
        res.size = size_of(model, mcfg)
        if cfg.data is not None:
            if text is None:
                tokenizers = [open_tokenizer(resolve(s, cfg.out, log)) for s in specs]
                text, source = text_for(cfg.data, tokenizers, cfg.out)
            log(f"{res.label}: perplexity on {source}")
            res.text = perplexity(model, tokenizer, text)
        if task is not None:
            log(f"{res.label}: {task} on {cfg.tasks}")
            if fmt == "chat" and (added := ensure_chat_tokens(model, tokenizer)):
                res.notes.append(f"no chat template: {', '.join(added)} added to prompt it with the same ChatML "
                                 "template as the others (new embedding rows = the mean embedding)")
            runs.append(run_task(model, tokenizer, mcfg, task, cfg.tasks, max_tokens=cfg.max_tokens, limit=cfg.limit,
                                 timeout=cfg.timeout, log=log))
        if prompts:
            log(f"{res.label}: answering {len(prompts)} prompts")
            res.answers = _answers(model, tokenizer, prompts, cfg)
    if runs:
        log(f"bootstrap: {cfg.bootstrap} resamples of {len(runs[0].preds)} examples")
        values, diffs = paired(lambda m, idx: runs[m].resample(task, idx), len(runs), len(runs[0].preds),
                               cfg.bootstrap, cfg.seed)
        for res, v, d in zip(results, values, diffs):
            res.task, res.diff = v, d
    _speed(specs, results, cfg, log)
    disagreements = _write_predictions(cfg, task, results, runs) if runs else []
    summary = {"models": [asdict(r) for r in results], "text_source": source, "task": task,
               "tasks_file": str(cfg.tasks) if cfg.tasks else None, "n_examples": len(runs[0].preds) if runs else 0,
               "bootstrap": cfg.bootstrap, "seed": cfg.seed, "device": _device(),
               "bleu_tokenize": bleu_tokenizer(runs[0].refs) if task == "translate" and runs else None,
               "disagreements": disagreements}
    write_report(summary, cfg.out)
    return summary


def _write_predictions(cfg: CompareConfig, task: str, results: list, runs: list, shown: int = 10) -> list[dict]:
    """OUT/predictions.jsonl: each example's place in the task file, reference and every model's
    answer (for code: whether it passed), so a reader can see why a score is what it is.
    Returns the first `shown` examples where the models' answers differ."""
    records = read_records(cfg.tasks)[1][:cfg.limit]
    rows = []
    for i, rec in enumerate(records):
        row = {"where": rec.where, "answers": {r.label: run.preds[i] for r, run in zip(results, runs)}}
        if task == "code":
            row["passed"] = {r.label: run.refs[i] for r, run in zip(results, runs)}
        else:
            row["reference"] = runs[0].refs[i]
        rows.append(row)
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return [r for r in rows if len({json.dumps(a) for a in r["answers"].values()}) > 1][:shown]


def last_line(summary: dict) -> dict:
    """The headline numbers per model, for the command's last line of JSON."""
    return {m["label"]: {"bpb": m["text"].get("bpb"), **{k: e["value"] for k, e in m["task"].items()},
                         **{f"{k}_diff": e["value"] for k, e in m["diff"].items()}} for m in summary["models"]}


def _task_name(cfg: CompareConfig) -> tuple[str | None, str | None]:
    """The task to score the --tasks file as, and the file's format."""
    if cfg.tasks is None:
        return None, None
    fmt = read_records(cfg.tasks)[0]
    task = AUTO_TASK.get(fmt) if cfg.task == "auto" else cfg.task
    if task is None or task == "perplexity":
        raise GptkitError(f"--tasks {cfg.tasks}: a {fmt} file; compare scores qa, summarize, translate, classify or "
                          "code records (text goes in --data)")
    return task, fmt


def _prompts(path: Path | None) -> list[str]:
    if path is None:
        return []
    if not path.is_file():
        raise GptkitError(f"--prompts {path}: file not found")
    prompts = [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise GptkitError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def _answers(model, tokenizer, prompts: list[str], cfg: CompareConfig) -> list[dict]:
    ids = [tokenizer.encode(p) for p in prompts]
    greedy = generate_all(model, tokenizer, ids, cfg.answer_tokens)
    sampled = generate_all(model, tokenizer, ids, cfg.answer_tokens, temperature=cfg.temperature, seed=cfg.seed)
    return [{"prompt": p, "greedy": g, "sampled": s} for p, g, s in zip(prompts, greedy, sampled)]


def _speed(specs: list[ModelSpec], results: list[ModelResult], cfg: CompareConfig, log: Log) -> None:
    for r in range(cfg.speed_rounds):  # models alternate, so a busy spell on a shared machine hits all alike
        for spec, res in zip(specs, results):
            model, tokenizer, _ = load(spec, cfg.out, log)
            got = measure_speed(model, tokenizer)
            log(f"{res.label}: speed round {r + 1}: prefill {got['prefill_tokens_per_s']:,.0f} tokens/s, "
                f"decode {got['decode_tokens_per_s']:,.0f} tokens/s")
            by_round = {f"{k}_by_round": res.speed.get(f"{k}_by_round", []) + [got[k]]  # to show the noise
                        for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            res.speed = {k: max(res.speed.get(k, 0), v) for k, v in got.items()} | {"rounds": r + 1} | by_round


def _device() -> str:
    """The device the speed figures were measured on: the one build_engine's `auto` resolves to."""
    return f"{device_name(resolve_device())}, {os.cpu_count()} CPU cores"
