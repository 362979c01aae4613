"""Attention maps: token labels, `gptkit attention` (PNG and JSON from the model's own
weights), one-line errors, and the CJK font hint."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.evaluation import attention as A
from gptkit.cli import app
from gptkit.checkpoint.format import save_checkpoint
from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import BPETokenizer

DREAM = "我有一个梦想"


def gptkit(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def byte_tok():
    """A BPE tokenizer that never saw Chinese: each character is three byte-level tokens."""
    return BPETokenizer.train(["def add(a, b):\n    return a + b\n" * 20], vocab_size=300)


@pytest.fixture(scope="module")
def ckpt(byte_tok, tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=byte_tok.vocab_size, block_size=32, n_layer=2, n_head=3, n_embd=48))
    return save_checkpoint(tmp_path_factory.mktemp("attention") / "tiny", model.eval(), byte_tok)


def test_labels_number_the_pieces_of_split_characters(byte_tok):
    ids = byte_tok.encode("a b\n梦")
    assert A.token_labels(byte_tok, ids)[-3:] == ["梦¹", "梦²", "梦³"]
    assert "".join(A.token_labels(byte_tok, byte_tok.encode("a b\n"))) == "a␣b↵"


def test_command_writes_the_models_weights(ckpt, tmp_path):
    png, js = tmp_path / "att.png", tmp_path / "att.json"
    r = gptkit("attention", ckpt, DREAM, "--out", png, "--json", js)
    assert r.exit_code == 0, r.output
    assert "18 tokens 我¹ 我² 我³ 有¹" in r.stdout and "layer 1, 3 heads" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    w = np.array(data["weights"])
    assert w.shape == (2, 3, 18, 18) and data["tokens"][:3] == ["我¹", "我²", "我³"]
    np.testing.assert_allclose(w.sum(-1), 1, atol=1e-3)  # rounded to 4 decimals
    assert np.triu(w, 1).max() == 0  # causal

    model = open_checkpoint(ckpt).model
    with torch.no_grad():
        _, maps = model.attention_maps(torch.tensor([open_tokenizer(ckpt).encode(DREAM)]))
    np.testing.assert_allclose(w, maps[:, 0].numpy(), atol=1e-4)


def test_one_head_and_errors(ckpt, tmp_path):
    def run(*args):
        return gptkit("attention", ckpt, DREAM, "--out", tmp_path / "h.png", *args)

    r = run("--layer", "0", "--head", "2")
    assert r.exit_code == 0 and "layer 0, head 2" in r.stdout and (tmp_path / "h.png").exists()
    for args, message in ((["--layer", "2"], "layer 2: the model has layers 0..1"),
                          (["--head", "3"], "head 3: the model has heads 0..2")):
        r = run(*args)
        assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: {message}"], r.output


def test_long_text_keeps_the_first_context(ckpt, byte_tok):
    model = open_checkpoint(ckpt).model
    maps = A.attention_maps(model.eval(), byte_tok, "a + b " * 40)
    assert maps.truncated and len(maps.token_ids) == 32 and maps.weights.shape == (2, 3, 32, 32)
    capped = A.attention_maps(model.eval(), byte_tok, "a + b " * 40, max_tokens=8)  # the server's cap
    assert capped.truncated and capped.token_ids == maps.token_ids[:8] and capped.weights.shape == (2, 3, 8, 8)


def test_cjk_font_or_a_one_line_hint(ckpt, byte_tok, tmp_path, monkeypatch, capsys):
    model = open_checkpoint(ckpt).model
    maps = A.attention_maps(model.eval(), byte_tok, DREAM)
    monkeypatch.setattr(A, "cjk_font", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's warning per missing glyph is not shown either
        A.plot(maps, tmp_path / "no-font.png")
    assert capsys.readouterr().err.strip() == A.CJK_HINT
    monkeypatch.undo()
    font = A.cjk_font()
    if font is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    assert "CJK" in font
    A.plot(maps, tmp_path / "font.png")
    assert capsys.readouterr().err == ""
