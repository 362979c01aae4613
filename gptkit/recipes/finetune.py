"""Recipes that prove fine-tuning works end to end, on data generated on the spot.

    arithmetic  "What is 37+48?" -> "85": full fine-tuning and LoRA, exact match on held-out sums
    docs        a documentation assistant: chat-tune a base on "What does json.dumps do?" ->
                the docstring's first sentence; ROUGE-L on held-out functions vs the untuned base
    classify    which standard-library module a docstring comes from; accuracy vs majority class
    multitask   arithmetic + classify in one run, against the two single-task runs

Arithmetic, classify and multitask start from one small character-level base, pretrained
(through `finetune` on plain text records) on equations "a+b=c" and on docstrings of the
training split; held-out sums and docstrings are never seen. Every step writes real files
(JSONL data, checkpoints) and runs the same functions as the CLI commands.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptkit.checkpoint.format import save_checkpoint
from gptkit.checkpoint.open import open_checkpoint
from gptkit.checkpoint.rundir import is_checkpoint
from gptkit.config import ModelConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.evaluation.evaluate import accuracy_f1, classify, exact_match, generate_all, mean, rouge_l
from gptkit.model.gpt import GPT
from gptkit.model.lora import LoRAConfig
from gptkit.text.chat import render_chat
from gptkit.text.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from gptkit.training.finetune import DataSpec, FinetuneConfig, ensure_chat_tokens, finetune

Log = Callable[[str], None]
CLASS_MODULES = ("os", "math", "socket", "logging", "inspect")
DOC_MODULES = ("os", "os.path", "json", "re", "math", "random", "string", "textwrap", "shutil", "pathlib", "statistics",
               "itertools", "functools", "collections", "datetime", "time", "socket", "logging", "inspect", "heapq",
               "bisect", "base64", "hashlib", "struct", "glob", "fnmatch", "tempfile", "copy", "csv", "zipfile",
               "tarfile", "urllib.parse", "html", "difflib", "operator", "codecs", "locale", "platform", "signal",
               "threading", "subprocess", "uuid", "calendar", "decimal", "fractions", "cmath", "zlib", "gzip", "shlex")


@dataclass
class Scale:
    """How big a run is: the full recipe, or the fast one the tests run."""

    max_operand: int = 100  # sums a+b with 0 <= a, b < max_operand
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(
        vocab_size=512, block_size=96, n_layer=3, n_head=4, n_embd=96))
    base_steps: int = 4000
    base_batch_size: int = 16  # windows of block_size characters: about 10 equations each
    task_steps: int = 2000  # arithmetic QA
    class_steps: int = 800
    lora_steps: int = 2500
    batch_size: int = 32
    docs_steps: int = 400
    pref_sft_steps: int = 1000  # the preference recipe: chat-tuning on demonstrations, then DPO
    pref_steps: int = 400
    pref_lr: float = 3e-4
    pref_beta: float = 0.5
    pref_sft_weight: float = 1.0  # plain DPO (0) lowered exact match here: see gptkit.recipes.preference
    tools_examples: int = 3000  # the tools recipe: synthetic conversations, a model trained from scratch
    tools_steps: int = 1600
    tools_batch: int = 16  # conversations of ~330 tokens, most of them the tools' description
    tools_vocab: int = 1024
    tools_model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(
        vocab_size=1024, block_size=352, n_layer=3, n_head=4, n_embd=128))
    test_size: int = 400
    base_docs: int = 0  # docstrings in the base's pretraining text (the base is for sums; 0 keeps it fast)
    optimizer: str = TrainConfig.optimizer  # of every training run (LoRA adapters and heads always use AdamW)


FULL = Scale()
FAST = Scale(max_operand=20, model=ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64),
             base_steps=600, base_batch_size=16, task_steps=500, class_steps=300, lora_steps=300, batch_size=32, docs_steps=150, pref_sft_steps=500, pref_steps=150,
             tools_examples=400, tools_steps=60, tools_vocab=600,
             tools_model=ModelConfig(vocab_size=600, block_size=352, n_layer=1, n_head=2, n_embd=32), test_size=60)


# ---------------------------------------------------------------------------- data
def sums(max_operand: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, held-out) operand pairs: 10% of all pairs are never trained on."""
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(pairs)
    n_test = len(pairs) // 10
    return pairs[n_test:], pairs[:n_test]


def qa_record(a: int, b: int) -> dict:
    return {"prompt": f"What is {a}+{b}?\n", "completion": str(a + b)}


def docstrings(modules: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(module, qualified name, docstring) of public functions, classes and methods, sorted."""
    out = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a platform without the module: the recipe uses the others
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not _documented(obj, module):
                continue
            out.append((name, f"{name}.{attr}", inspect.getdoc(obj)))
            if inspect.isclass(obj):
                out += [(name, f"{name}.{attr}.{m}", inspect.getdoc(f)) for m, f in sorted(vars(obj).items())
                        if not m.startswith("_") and _documented(f, module) and inspect.getdoc(f) != inspect.getdoc(obj)]
    return out


def _documented(obj, module) -> bool:
    if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj) or inspect.ismethoddescriptor(obj)):
        return False
    if getattr(obj, "__module__", None) not in (None, module.__name__, "posix", "_socket", "math"):
        return False  # re-exported from elsewhere
    doc = inspect.getdoc(obj)
    return bool(doc) and len(doc) >= 20


def first_sentence(doc: str, limit: int = 160) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return (m.group(1) if m else para)[:limit]


def split(items: list, seed: int, fraction: float = 0.15) -> tuple[list, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    n_test = max(1, int(len(items) * fraction))
    return items[n_test:], items[:n_test]


def class_record(module: str, doc: str) -> dict:
    """The docstring with its module's own name masked, so the label is not simply spelled out."""
    text = re.sub(rf"\b{re.escape(module)}\b", "...", " ".join(doc.split()))
    return {"text": text[:80], "label": module}  # the first 80 characters: cheap on a CPU, and enough


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- shared steps
def train_cfg(out: Path, steps: int, scale: Scale, seed: int, lr: float, batch_size: int | None = None) -> TrainConfig:
    return TrainConfig(out_dir=str(out), max_steps=steps, batch_size=batch_size or scale.batch_size, lr=lr,
                       warmup_steps=max(1, steps // 20), weight_decay=0.0, eval_interval=max(1, steps // 2),
                       eval_batches=4, log_interval=max(1, steps // 10), seed=seed, progress=False,
                       optimizer=scale.optimizer)


def small_base(out: Path, texts: list[str], scale: Scale, seed: int, log: Log, steps: int,
               tokenizer: Tokenizer | None = None, joined: bool = False) -> Path:
    """A small GPT pretrained on texts with a character-level tokenizer unless one is given;
    reused when present. joined: one plain text file (cut into context-sized windows, so
    every position is trained), else one {"text"} record per text."""

    base = out / "base"
    if is_checkpoint(base):
        log(f"reusing the base model in {base}")
        return base
    tokenizer = tokenizer or CharTokenizer.train(texts)
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(scale.model, vocab_size=tokenizer.vocab_size))
    save_checkpoint(out / "init", model, tokenizer)
    if joined:
        data = out / "data" / "pretrain.txt"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("\n".join(texts) + "\n", encoding="utf-8")
    else:
        data = write_jsonl(out / "data" / "pretrain.jsonl", [{"text": t} for t in texts])
    log(f"pretraining a {model.num_params() / 1e6:.2f}M-parameter {tokenizer.kind} base on {len(texts)} texts")
    cfg = train_cfg(base, steps, scale, seed, lr=3e-3, batch_size=scale.base_batch_size)
    finetune(out / "init", [DataSpec(str(data))], cfg, log=log)
    return base


def arithmetic_and_docs_base(out: Path, scale: Scale, seed: int, log: Log):
    """The base of arithmetic/classify/multitask, and the data splits it was built from."""
    train_pairs, test_pairs = sums(scale.max_operand, seed)
    docs = [(m, d) for m, _, d in docstrings(CLASS_MODULES)]
    train_docs, test_docs = split(docs, seed)
    texts = [f"{a}+{b}={a + b}" for a, b in train_pairs]
    texts += [class_record(m, d)["text"] for m, d in train_docs][:scale.base_docs]
    random.Random(seed).shuffle(texts)
    # one text of equations, so that sums are seen at every position of the context (with
    # learned positions, a model trained only on short lines cannot add after a long prompt)
    base = small_base(out, texts, scale, seed, log, scale.base_steps, joined=True)
    return base, (train_pairs, test_pairs), (train_docs, test_docs)


def sum_exact_match(ckpt: Path, pairs: list[tuple[int, int]], limit: int) -> float:
    loaded = open_checkpoint(ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    records = [qa_record(a, b) for a, b in pairs[:limit]]
    preds = generate_all(model, tokenizer, [tokenizer.encode(r["prompt"]) for r in records], max_tokens=5)
    return mean([exact_match(p, r["completion"]) for p, r in zip(preds, records)])


def docstring_accuracy(ckpt: Path, test_docs: list[tuple[str, str]]) -> dict[str, float]:
    loaded = open_checkpoint(ckpt)
    records = [class_record(m, d) for m, d in test_docs]
    preds = classify(loaded.model, loaded.tokenizer, [r["text"] for r in records], loaded.meta.labels)
    return accuracy_f1(preds, [r["label"] for r in records])


def _cached(path: Path, run: Callable[[], dict]) -> dict:
    """A sub-run's metrics, reused when an earlier recipe already measured them."""
    if path.is_file():
        return json.loads(path.read_text())
    result = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------------------- the recipes
def _qa_files(out: Path, train_pairs: list, seed: int) -> DataSpec:
    train, val = split(train_pairs, seed, fraction=0.05)
    return DataSpec(write_jsonl(out / "data" / "qa_train.jsonl", [qa_record(a, b) for a, b in train]),
                    val=write_jsonl(out / "data" / "qa_val.jsonl", [qa_record(a, b) for a, b in val]), name="qa")


def _cls_files(out: Path, train_docs: list, seed: int) -> DataSpec:
    train, val = split(train_docs, seed, fraction=0.1)
    return DataSpec(write_jsonl(out / "data" / "cls_train.jsonl", [class_record(m, d) for m, d in train]),
                    val=write_jsonl(out / "data" / "cls_val.jsonl", [class_record(m, d) for m, d in val]), name="cls")


def _run_full_qa(out, base, pairs, scale, seed, log) -> dict:
    spec = _qa_files(out, pairs[0], seed)
    r = finetune(base, [spec], train_cfg(out / "arithmetic_full", scale.task_steps, scale, seed, 2e-3), log=log)
    return {"exact_match": sum_exact_match(out / "arithmetic_full", pairs[1], scale.test_size),
            "trainable_params": r["trainable_params"], "total_params": r["total_params"]}


def _run_lora_qa(out, base, pairs, scale, seed, log) -> dict:
    spec = _qa_files(out, pairs[0], seed)
    lora = LoRAConfig(rank=4, alpha=8.0)
    r = finetune(base, [spec], train_cfg(out / "arithmetic_lora", scale.lora_steps, scale, seed, 5e-3),
                 FinetuneConfig(lora=lora), log=log)
    return {"exact_match": sum_exact_match(out / "arithmetic_lora", pairs[1], scale.test_size),
            "trainable_params": r["trainable_params"], "total_params": r["total_params"]}


def _run_classify(out, base, docs, scale, seed, log) -> dict:
    spec = _cls_files(out, docs[0], seed)
    finetune(base, [spec], train_cfg(out / "classify", scale.class_steps, scale, seed, 1e-3),
             FinetuneConfig(task="classify"), log=log)
    return docstring_accuracy(out / "classify", docs[1])


def arithmetic(out: Path, scale: Scale, seed: int, log: Log, **_) -> dict:
    base, pairs, _ = arithmetic_and_docs_base(out, scale, seed, log)
    full = _cached(out / "results" / "arithmetic_full.json", lambda: _run_full_qa(out, base, pairs, scale, seed, log))
    lora = _cached(out / "results" / "arithmetic_lora.json", lambda: _run_lora_qa(out, base, pairs, scale, seed, log))
    base_em = sum_exact_match(base, pairs[1], scale.test_size)
    return {"recipe": "arithmetic", "held_out_sums": min(len(pairs[1]), scale.test_size), "base_exact_match": base_em,
            "full_exact_match": full["exact_match"], "lora_exact_match": lora["exact_match"],
            "lora_trainable_fraction": lora["trainable_params"] / lora["total_params"]}


def classify_recipe(out: Path, scale: Scale, seed: int, log: Log, **_) -> dict:
    base, _, docs = arithmetic_and_docs_base(out, scale, seed, log)
    m = _cached(out / "results" / "classify.json", lambda: _run_classify(out, base, docs, scale, seed, log))
    return {"recipe": "classify", "modules": list(CLASS_MODULES), "train_docstrings": len(docs[0]),
            "test_docstrings": len(docs[1]), **m}


def multitask(out: Path, scale: Scale, seed: int, log: Log, **_) -> dict:
    base, pairs, docs = arithmetic_and_docs_base(out, scale, seed, log)
    single_qa = _cached(out / "results" / "arithmetic_full.json", lambda: _run_full_qa(out, base, pairs, scale, seed, log))
    single_cls = _cached(out / "results" / "classify.json", lambda: _run_classify(out, base, docs, scale, seed, log))
    specs = [_qa_files(out, pairs[0], seed), _cls_files(out, docs[0], seed)]
    # the single runs' steps added up, sampled in that ratio: each task gets about as many batches as alone
    specs[0].weight, specs[1].weight = scale.task_steps, scale.class_steps
    steps = scale.task_steps + scale.class_steps
    finetune(base, specs, train_cfg(out / "multitask", steps, scale, seed, 2e-3), log=log)
    em = sum_exact_match(out / "multitask", pairs[1], scale.test_size)
    acc = docstring_accuracy(out / "multitask", docs[1])
    return {"recipe": "multitask", "exact_match": em, "single_task_exact_match": single_qa["exact_match"],
            "accuracy": acc["accuracy"], "single_task_accuracy": single_cls["accuracy"],
            "macro_f1": acc["macro_f1"], "majority_baseline": acc["majority_baseline"]}


def docs_assistant(out: Path, scale: Scale, seed: int, log: Log, base: str | None = None) -> dict:
    """Chat-tune a base on docstring Q/A pairs; ROUGE-L of answers on held-out functions."""
    items = [(name, first_sentence(doc)) for _, name, doc in docstrings(DOC_MODULES)]
    train, test = split(items, seed, fraction=0.1)
    base_path = Path(base) if base else Path("runs/demo/model")
    if not is_checkpoint(base_path):
        if base:
            raise GptkitError(f"--base {base}: not a checkpoint folder")
        base_path = _docs_base(out / "docs", dict(train), scale, seed, log)
    chat = lambda q, a=None: {"messages": [{"role": "user", "content": f"What does {q} do?"}]  # noqa: E731
                                          + ([{"role": "assistant", "content": a}] if a is not None else [])}
    tr, val = split(train, seed, fraction=0.05)
    spec = DataSpec(write_jsonl(out / "docs" / "data" / "train.jsonl", [chat(q, a) for q, a in tr]),
                    val=write_jsonl(out / "docs" / "data" / "val.jsonl", [chat(q, a) for q, a in val]), name="docs")
    tuned = out / "docs" / "assistant"
    finetune(base_path, [spec], train_cfg(tuned, scale.docs_steps, scale, seed, 5e-4), log=log)
    test = test[:scale.test_size]
    scores = {}
    for label, ckpt in (("base", base_path), ("tuned", tuned)):
        scores[label] = _rouge_on(ckpt, [chat(q) for q, _ in test], [a for _, a in test])
    return {"recipe": "docs", "base": str(base_path), "train_pairs": len(tr), "held_out_functions": len(test),
            "base_rouge_l": scores["base"], "tuned_rouge_l": scores["tuned"]}


def _docs_base(out: Path, train: dict[str, str], scale: Scale, seed: int, log: Log) -> Path:
    """Without the `make demo` model: a small BPE model pretrained on the training functions'
    docstrings (a 1024-token BPE keeps sequences short enough for a CPU)."""
    log("no `make demo` checkpoint in runs/demo/model: pretraining a small base on the docstrings first")
    texts = [f"{name}: {' '.join(doc.split())}" for _, name, doc in docstrings(DOC_MODULES) if name in train]
    return small_base(out, texts, scale, seed, log, scale.docs_steps, tokenizer=BPETokenizer.train(texts, 1024))


def _rouge_on(ckpt: Path, conversations: list[dict], refs: list[str]) -> float:
    loaded = open_checkpoint(ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    ensure_chat_tokens(model, tokenizer)  # the untuned base is prompted the same way, with the same template
    prompts = [render_chat(tokenizer, c["messages"])[0] for c in conversations]
    preds = generate_all(model, tokenizer, prompts, max_tokens=80)
    return mean([rouge_l(p, r) for p, r in zip(preds, refs)])
