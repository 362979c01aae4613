"""`gptkit recipe tools`: a small model learns to call tools, from scratch, on a CPU.

Two functions, a calculator `add(a, b)` and a unit converter `convert(value, unit)` (km to miles
or miles to km), with arguments drawn at random. Synthetic conversations in OpenAI's
fine-tuning format for function calling ({"messages", "tools"}): a request (English or Chinese,
several phrasings), the assistant's call, the tool's result in a `tool` message, and the
assistant's answer that repeats the result. A small GPT (random init, a BPE tokenizer trained on
the conversations) is chat-tuned on them through `finetune`, then measured on held-out requests
whose arguments were never trained on, through the engine as `serve` runs it (greedy, the tools
in the prompt, tool_choice "auto": nothing forces the format):

- calls: the reply holds exactly one call, to the right function, with exactly the arguments;
- answers: after the true result in a `tool` message, the reply is "The answer is RESULT.".
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from gptkit.checkpoint.format import save_checkpoint
from gptkit.checkpoint.open import open_checkpoint
from gptkit.evaluation.evaluate import generate_all
from gptkit.model.gpt import GPT
from gptkit.recipes.finetune import Log, Scale, split, train_cfg, write_jsonl
from gptkit.text.chat import render_chat, with_tools
from gptkit.text.tokenizer import BPETokenizer
from gptkit.text.tools import parse_tool_calls
from gptkit.training.finetune import DataSpec, finetune

TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "convert", "description": "Convert a distance.", "parameters": {
        "type": "object", "properties": {"value": {"type": "integer"}, "unit": {"enum": ["km_to_mi", "mi_to_km"]}},
        "required": ["value", "unit"]}}},
]
ASK = {"add": ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "{a} 加 {b} 等于多少？"],
       "km_to_mi": ["How many miles is {value} km?", "Convert {value} km to miles.", "{value} 公里是多少英里？"],
       "mi_to_km": ["How many km is {value} miles?", "Convert {value} miles to km.", "{value} 英里是多少公里？"]}
FACTOR = {"km_to_mi": 0.621371, "mi_to_km": 1.609344}


def request(rng: random.Random) -> tuple[str, str, dict]:
    """(question, function, arguments) drawn at random."""
    if rng.random() < 0.5:
        args = {"a": rng.randrange(1000), "b": rng.randrange(1000)}
        return rng.choice(ASK["add"]).format(**args), "add", args
    unit = rng.choice(list(FACTOR))
    args = {"value": rng.randrange(1, 1000), "unit": unit}
    return rng.choice(ASK[unit]).format(**args), "convert", args


def result(function: str, args: dict) -> str:
    return str(args["a"] + args["b"]) if function == "add" else f"{args['value'] * FACTOR[args['unit']]:.2f}"


def call_message(function: str, args: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": function, "arguments": json.dumps(args)}}]}


def conversation(question: str, function: str, args: dict) -> dict:
    value = result(function, args)
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question}, call_message(function, args),
        {"role": "tool", "tool_call_id": "call_0", "content": value},
        {"role": "assistant", "content": f"The answer is {value}."}]}


def requests(n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Train and held-out requests; no held-out (function, arguments) is ever trained on."""
    rng = random.Random(seed)
    seen, train, test = set(), [], []
    while len(train) < n_train:
        q, f, args = request(rng)
        seen.add((f, json.dumps(args, sort_keys=True)))
        train.append((q, f, args))
    while len(test) < n_test:
        q, f, args = request(rng)
        if (f, json.dumps(args, sort_keys=True)) not in seen:
            test.append((q, f, args))
    return train, test


def tools(out: Path, scale: Scale, seed: int, log: Log, **_) -> dict:
    folder = out / "tools"
    train, test = requests(scale.tools_examples, scale.test_size, seed)
    records = [conversation(*r) for r in train]
    fit, val = split(records, seed, fraction=0.05)
    spec = DataSpec(write_jsonl(folder / "data" / "train.jsonl", fit), val=write_jsonl(folder / "data" / "val.jsonl", val),
                    name="tools")
    # a BPE tokenizer of the conversations as the model sees them (the tools' description included)
    tokenizer = BPETokenizer.train([_text(r) for r in records[:2000]], vocab_size=scale.tools_vocab)
    torch.manual_seed(seed)
    model = GPT(dataclasses.replace(scale.tools_model, vocab_size=tokenizer.vocab_size))
    save_checkpoint(folder / "init", model, tokenizer)
    log(f"tools: a {model.num_params() / 1e6:.2f}M-parameter model from scratch on {len(fit)} conversations")
    tuned = folder / "model"
    finetune(folder / "init", [spec], train_cfg(tuned, scale.tools_steps, scale, seed, 2e-3, scale.tools_batch), log=log)
    return {"recipe": "tools", "held_out": len(test), **measure(tuned, test)}


def _text(record: dict) -> str:
    """A conversation as gptkit's template writes it (for training the tokenizer on the same text)."""
    return "\n".join(m["content"] or "" for m in with_tools(record["messages"], record["tools"]))


def measure(ckpt: Path, test: list[tuple[str, str, dict]]) -> dict:
    """Held-out calls (right function, exact arguments) and answers after the tool's result, greedy."""
    loaded = open_checkpoint(ckpt)
    model, tok = loaded.model, loaded.tokenizer
    asks = [render_chat(tok, [{"role": "user", "content": q}], tools=TOOLS)[0] for q, _, _ in test]
    replies = generate_all(model, tok, asks, max_tokens=48)
    names = {t["function"]["name"] for t in TOOLS}
    right = 0
    for (q, f, args), text in zip(test, replies):
        _, calls = parse_tool_calls(text, names)
        right += len(calls) == 1 and calls[0]["function"]["name"] == f and json.loads(
            calls[0]["function"]["arguments"]) == args
    after = [render_chat(tok, conversation(q, f, args)["messages"][:3], tools=TOOLS)[0] for q, f, args in test]
    answers = generate_all(model, tok, after, max_tokens=24)
    good = sum(a.strip() == f"The answer is {result(f, args)}." for (_, f, args), a in zip(test, answers))
    return {"call_accuracy": right / len(test), "answer_accuracy": good / len(test),
            "example": {"request": test[0][0], "reply": replies[0], "answer": answers[0]}}
