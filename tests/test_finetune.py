"""Fine-tuning: data formats and their errors, chat template and masks, padding, the
classification head, LoRA (adapter-only checkpoints, merge with identical outputs), mixtures."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.checkpoint.rundir import resolve_checkpoint
from gptkit.checkpoint.format import save_checkpoint
from gptkit.cli import app
from gptkit.errors import GptkitError
from gptkit.config import ModelConfig, TrainConfig
from gptkit.data.records import Example, TaskBatches, encode_lm, read_records
from gptkit.model.heads import class_logits
from gptkit.training.finetune import DataSpec, FinetuneConfig, ensure_chat_tokens, finetune
from gptkit.evaluation.evaluate import generate_all
from gptkit.model.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import EOT, IM_END, IM_START, CharTokenizer
from gptkit.text.chat import render_chat

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 +=?.,:\n'ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def make_base(folder, specials=None, seed=0, block_size=48, extra_chars=""):
    tok = CharTokenizer(sorted(set(CHARS) | set(extra_chars)), specials)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(folder, model, tok)
    return str(folder)


def train_cfg(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, eval_interval=3,
                eval_batches=2, log_interval=1, progress=False)
    return TrainConfig(**{**base, **kw})


CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i}"},
                      {"role": "assistant", "content": f"hello {i}"}]} for i in range(8)]
QA = [{"prompt": f"what is {a}+{b}? ", "completion": str(a + b)} for a in range(4) for b in range(4)]
CLS = [{"text": f"{w} {i}", "label": w[:3]} for i in range(6) for w in ("apple pie", "zebra run", "moon light")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "ckpt")


# ---------------------------------------------------------------------------- formats and errors
@pytest.mark.parametrize("records, fmt", [(CHAT, "chat"), (QA, "completion"), (CLS, "classify"),
                                          ([{"text": "abc"}], "text")])
def test_formats_are_detected(tmp_path, records, fmt):
    got, recs, skipped = read_records(write_jsonl(tmp_path / "d.jsonl", records))
    assert (got, len(recs), skipped) == (fmt, len(records), 0)


@pytest.mark.parametrize("good, bad, message", [
    (QA, "{not json", "invalid JSON"),
    (QA, '["a list"]', "expected a JSON object"),
    (QA, {"prompt": "q"}, "missing field 'completion'"),
    (QA, {"prompt": "q", "completion": 3}, "field 'completion' must be str"),
    (QA, {"text": "t", "label": "x"}, "a classify record in a completion file"),
    (CHAT, {"messages": [{"role": "bot", "content": "x"}]}, "messages[0]: role 'bot'"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    (CHAT, {"messages": []}, "'messages' must be a non-empty list"),
    (CLS, {"text": "t", "label": None}, "field 'label' must be str or int"),
])
def test_a_bad_record_names_file_and_line(tmp_path, good, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [good[0], "", good[1], bad, good[2]])
    with pytest.raises(GptkitError, match=rf"d\.jsonl:4: .*{re.escape(message)}"):
        read_records(path)
    fmt, records, skipped = read_records(path, skip_bad=True)
    assert (len(records), skipped) == (3, 1)


def test_plain_text_is_cut_into_windows_that_cover_every_token(tmp_path, base):
    text = "the quick brown fox " * 20
    (tmp_path / "t.txt").write_text(text)
    from gptkit.data.records import lm_examples

    tok = open_tokenizer(base)
    fmt, records, _ = read_records(tmp_path / "t.txt")
    examples, _ = lm_examples(fmt, records, tok, 48, False)
    assert all(len(e.ids) <= 48 for e in examples)
    targets = [t for e in examples for t in e.targets]
    assert targets == tok.encode(text)[1:] + [tok.eot_id]


def test_cli_reports_a_bad_record_in_one_line(tmp_path, base):
    path = write_jsonl(tmp_path / "d.jsonl", [QA[0], {"prompt": 1, "completion": "x"}])
    r = CliRunner().invoke(app, ["finetune", base, path, "--out", str(tmp_path / "o"), "--max-steps", "1"])
    assert r.exit_code == 2
    assert "d.jsonl:2: field 'prompt' must be str" in r.output and len(r.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- chat
def test_chat_tokens_are_added_and_the_tied_embedding_grows(tmp_path):
    folder = make_base(tmp_path / "b", specials=[EOT])
    model = open_checkpoint(folder).model
    tok = open_tokenizer(folder)
    old = model.wte.weight.detach().clone()
    assert ensure_chat_tokens(model, tok) == [IM_START, IM_END]
    V = tok.vocab_size
    assert model.wte.weight.shape[0] == V == model.config.vocab_size == old.shape[0] + 2
    assert model.lm_head.weight is model.wte.weight
    assert torch.equal(model.wte.weight[:old.shape[0]], old)
    assert torch.allclose(model.wte.weight[-1], old.mean(0))
    assert model(torch.tensor([[tok.special_id(IM_END)]])).shape[-1] == V


def test_chat_finetune_stores_the_template_and_renders_as_chat_and_serve(tmp_path):
    folder = make_base(tmp_path / "b", specials=[EOT])  # no chat tokens yet
    out = tmp_path / "chat"
    finetune(folder, [DataSpec(write_jsonl(tmp_path / "c.jsonl", CHAT))], train_cfg(out), log=lambda m: None)
    tok = open_tokenizer(out)
    assert tok.chat_template is not None and tok.special_id(IM_START) is not None
    model = open_checkpoint(out).model
    assert model.config.vocab_size == tok.vocab_size
    msgs = CHAT[0]["messages"]
    ids, mask = encode_lm("chat", CHAT[0], tok)
    assert (ids, mask) == render_chat(tok, msgs, add_generation_prompt=False)
    # the prompt chat/serve send is a prefix of what training saw, up to the assistant header
    prompt, _ = render_chat(tok, msgs[:-1])
    assert ids[:len(prompt)] == prompt
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "hello 0" + IM_END


def test_chat_command_keeps_history_and_handles_reset_system_exit(tmp_path):
    """`gptkit chat`: each reply is the engine's greedy answer to the whole conversation so far,
    rendered with the stored template; /reset forgets the turns, /system sets the system message."""
    from gptkit.config import SampleConfig
    from gptkit.inference.engine import Engine
    from gptkit.text.stream import completion_text

    folder = make_base(tmp_path / "b", specials=[EOT], block_size=256)
    out = tmp_path / "chat"
    finetune(folder, [DataSpec(write_jsonl(tmp_path / "c.jsonl", CHAT))], train_cfg(out), log=lambda m: None)
    model = open_checkpoint(out).model
    tok = open_tokenizer(out)
    with torch.no_grad():  # larger weights than a few steps give: replies that depend on the whole prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    save_checkpoint(out, model, tok)
    engine = Engine(model, token_bytes=tok.token_bytes, eos_ids=[tok.special_id(IM_END)])

    def reply(messages):
        ids, _ = render_chat(tok, messages)
        return completion_text(tok, engine.generate(ids, SampleConfig(max_tokens=8, temperature=0.0))[0])

    r = CliRunner().invoke(app, ["chat", str(out), "--temperature", "0", "--max-tokens", "8"],
                           input="hi 1\nhi 2\n/reset\nhi 2\n/system be brief\nhi 3\n/exit\nnever read\n")
    assert r.exit_code == 0, r.output
    first = reply([{"role": "user", "content": "hi 1"}])
    second = reply([{"role": "user", "content": "hi 1"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "hi 2"}])
    fresh = reply([{"role": "user", "content": "hi 2"}])
    system = reply([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi 2"},
                    {"role": "assistant", "content": fresh}, {"role": "user", "content": "hi 3"}])
    replies = [line.split("model> ", 1)[1] for line in r.output.splitlines() if "model> " in line]
    assert replies == [first, second, fresh, system]
    assert len({first, second, system}) == 3  # the history changes the answer: the test can fail
    assert "(history cleared)" in r.output and "(system message set)" in r.output
    # the same weights quantised to int8 (as `generate --quantize int8`): the chat runs and answers
    q = CliRunner().invoke(app, ["chat", str(out), "--temperature", "0", "--max-tokens", "8", "--quantize", "int8"],
                           input="hi 1\n/exit\n")
    assert q.exit_code == 0 and "model> " in q.output, q.output
    bad = CliRunner().invoke(app, ["chat", str(out), "--dtype", "float8"], input="/exit\n")
    assert bad.exit_code == 2 and "float8" in bad.output and "Traceback" not in bad.output


# ---------------------------------------------------------------------------- padding
def test_right_padding_changes_nothing_for_real_tokens(base):
    model = open_checkpoint(base).model
    tok = open_tokenizer(base)
    examples = [Example(tok.encode("hello world"), tok.encode("ello world!")),
                Example(tok.encode("hi"), [-100, tok.encode("!")[0]])]
    x, y = TaskBatches("lm", examples, [], 2, tok.eot_id).collate(examples)
    assert x.shape == (2, 11) and (y[1, 2:] == -100).all()
    logits = model(x)
    for row, e in enumerate(examples):
        alone = model(torch.tensor([e.ids]))[0]
        assert torch.allclose(logits[row, :len(e.ids)], alone, atol=1e-5)
    counts = [sum(t != -100 for t in e.targets) for e in examples]
    singles = [model(torch.tensor([e.ids]), targets=torch.tensor([e.targets])) for e in examples]
    expected = sum(l * n for l, n in zip(singles, counts)) / sum(counts)
    assert torch.allclose(model(x, targets=y), expected, atol=1e-5)


# ---------------------------------------------------------------------------- classification
def test_class_head_reads_the_last_real_token(base):
    model = open_checkpoint(base).model
    from gptkit.model.heads import add_class_head

    add_class_head(model, 3)
    examples = [Example([5, 6, 7, 8], label=0), Example([9, 10], label=2)]
    x, last, labels = TaskBatches("classify", examples, [], 2, 0).collate(examples)
    assert last.tolist() == [3, 1] and labels.tolist() == [0, 2]
    batched = class_logits(model, x, last)
    for row, e in enumerate(examples):
        alone = class_logits(model, torch.tensor([e.ids]), torch.tensor([len(e.ids) - 1]))
        assert torch.allclose(batched[row], alone[0], atol=1e-5)


def test_classify_checkpoint_keeps_head_and_labels(tmp_path, base):
    out = tmp_path / "cls"
    last = finetune(base, [DataSpec(write_jsonl(tmp_path / "c.jsonl", CLS))], train_cfg(out, max_steps=30),
                    FinetuneConfig(task="classify"), log=lambda m: None)
    assert last["val_loss"] < 1.0  # from ln(3) = 1.10 at the start
    keys = load_file(str(resolve_checkpoint(out) / "model.safetensors"))
    assert {"heads.classify.weight", "heads.classify.bias"} <= set(keys)
    model, cfg = (loaded := open_checkpoint(out)).model, loaded.meta
    assert cfg.extra["labels"] == ["app", "moo", "zeb"]
    assert model.heads["classify"].weight.shape == (3, 32)


def test_task_mismatch_is_a_user_error(tmp_path, base):
    with pytest.raises(GptkitError, match="--task classify: the data is q \\(completion\\)"):
        finetune(base, [DataSpec(write_jsonl(tmp_path / "q.jsonl", QA))], train_cfg(tmp_path / "o"),
                 FinetuneConfig(task="classify"))
    with pytest.raises(GptkitError, match=r"--task chat: expected auto, lm \(chat, prompt/completion and text records\)"):
        finetune(base, [DataSpec(write_jsonl(tmp_path / "q.jsonl", QA))], train_cfg(tmp_path / "o"),
                 FinetuneConfig(task="chat"))


# ---------------------------------------------------------------------------- LoRA
def test_lora_starts_as_the_base_and_merges_exactly(base):
    model = open_checkpoint(base).model
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    before = model(x)
    assert apply_lora(model, LoRAConfig(rank=4, alpha=8)) == 2 * 4  # per layer: c_attn, attn c_proj, c_fc, mlp c_proj
    assert torch.allclose(model(x), before)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    adapted = model(x)
    assert merge_lora(model) > 0 and torch.allclose(model(x), adapted, atol=1e-5)


def test_lora_trains_and_saves_only_adapters_and_merge_lora_matches(tmp_path, base):
    out = tmp_path / "lora"
    last = finetune(base, [DataSpec(write_jsonl(tmp_path / "q.jsonl", QA))], train_cfg(out),
                    FinetuneConfig(lora=LoRAConfig(rank=2, alpha=4)), log=lambda m: None)
    assert 0 < last["trainable_params"] < 0.2 * last["total_params"]
    saved = load_file(str(resolve_checkpoint(out) / "model.safetensors"))
    assert saved and all(".lora_A" in k or ".lora_B" in k for k in saved)
    base_model = open_checkpoint(base).model
    tuned, cfg = (loaded := open_checkpoint(out)).model, loaded.meta
    assert cfg.extra["base"] and cfg.extra["lora"]["rank"] == 2
    base_state = base_model.state_dict()
    assert all(torch.equal(v, base_state[k]) for k, v in tuned.state_dict().items() if "lora_" not in k)
    x = torch.randint(0, tuned.config.vocab_size, (2, 12))
    assert not torch.allclose(tuned(x), base_model(x))  # the adapters learned something
    r = CliRunner().invoke(app, ["merge-lora", str(out), str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged, mcfg = (loaded := open_checkpoint(tmp_path / "merged")).model, loaded.meta
    assert "lora" not in mcfg.extra and "base" not in mcfg.extra
    assert not any("lora" in k for k in load_file(str(resolve_checkpoint(tmp_path / "merged") / "model.safetensors")))
    assert torch.allclose(merged(x), tuned(x), atol=1e-5)
    tok = open_tokenizer(out)
    prompts = [tok.encode(q["prompt"]) for q in QA[:4]]
    assert generate_all(tuned, tok, prompts, 6) == generate_all(merged, tok, prompts, 6)
    assert any(isinstance(m, LoRALinear) for m in tuned.modules())  # generation left the model as it was


# ---------------------------------------------------------------------------- multi-task
def test_mixture_logs_per_task_val_loss_and_follows_weights(tmp_path, base):
    out = tmp_path / "mix"
    specs = [DataSpec(write_jsonl(tmp_path / "qa.jsonl", QA), weight=3.0),
             DataSpec(write_jsonl(tmp_path / "cls.jsonl", CLS), weight=1.0)]
    finetune(base, specs, train_cfg(out), log=lambda m: None)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert {"val_loss/qa", "val_loss/cls", "val_loss"} <= set(evals[-1])
    from gptkit.training.finetune import FinetuneConfig as FC, build_batches, load_tasks

    tasks = load_tasks(specs, FC())
    data, _ = build_batches(tasks, open_tokenizer(base), 48, train_cfg(out, batch_size=2), ["app", "moo", "zeb"], False)
    kinds = [len(data.train_batch()) for _ in range(400)]  # (x, y) for LM, (x, last, labels) for classify
    assert 0.68 < kinds.count(2) / 400 < 0.82  # weight 3:1 -> 0.75
