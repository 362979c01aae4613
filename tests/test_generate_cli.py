"""`gptkit generate` on a real checkpoint: greedy text equals the engine's, seeds, stops, and
the context limit (an error unless --truncate)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from gptkit.checkpoint.format import save_checkpoint
from gptkit.cli import app
from gptkit.config import ModelConfig, SampleConfig
from gptkit.inference.engine import Engine
from gptkit.text.stream import completion_text
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog. 我有一个梦想。"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)  # peaked logits: greedy has no near-ties
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), model, tok), model, tok


def gen(ckpt_dir, *args):
    return CliRunner().invoke(app, ["generate", str(ckpt_dir), *args])


def test_greedy_output_is_the_prompt_then_the_engines_continuation(ckpt):
    folder, model, tok = ckpt
    r = gen(folder, "-p", "the quick", "--max-tokens", "12", "--temperature", "0")
    assert r.exit_code == 0, r.output
    expected = completion_text(tok, Engine(model).generate(tok.encode("the quick"), SampleConfig(12, 0.0))[0])
    assert r.output == "the quick" + expected + "\n"


def test_seeded_samples_repeat_and_differ_by_seed(ckpt):
    args = ["-p", "我有", "--max-tokens", "10", "--temperature", "1.5", "--n", "2"]
    a, b = gen(ckpt[0], *args, "--seed", "3"), gen(ckpt[0], *args, "--seed", "3")
    c = gen(ckpt[0], *args, "--seed", "4")
    assert a.exit_code == 0 and a.output == b.output
    assert a.output.count("--- sample") == 2
    assert c.output != a.output


def test_stop_sequence_is_not_printed(ckpt):
    full = gen(ckpt[0], "-p", "the", "--max-tokens", "20", "--temperature", "0").output.rstrip("\n")
    stop = full[6:8]  # two characters the greedy continuation is known to produce
    cut = gen(ckpt[0], "-p", "the", "--max-tokens", "20", "--temperature", "0", "--stop", stop).output
    assert cut == full[:full.index(stop, 3)] + "\n"


def test_prompt_beyond_the_context_needs_truncate(ckpt):
    long_prompt = TEXT  # 45 characters > 32 - 5
    r = gen(ckpt[0], "-p", long_prompt, "--max-tokens", "5")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        f"error: prompt of {len(long_prompt)} tokens + max_tokens 5 = {len(long_prompt) + 5} > context 32; "
        "--truncate keeps the prompt's last 27 tokens"]
    ok = gen(ckpt[0], "-p", long_prompt, "--max-tokens", "5", "--truncate", "--temperature", "0")
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith(long_prompt[-27:])
    assert gen(ckpt[0], "-p", "x", "--max-tokens", "40").exit_code == 2  # no room left for any prompt


def test_default_max_tokens_fills_what_the_context_leaves(ckpt):
    folder, model, tok = ckpt
    r = gen(folder, "-p", "the quick", "--temperature", "0")  # 200 by default, but the context is 32
    assert r.exit_code == 0, r.output
    expected = completion_text(tok, Engine(model).generate(tok.encode("the quick"), SampleConfig(32 - 9, 0.0))[0])
    assert r.output == "the quick" + expected + "\n"
