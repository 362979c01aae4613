"""The model: shapes, attention math, positions, initialisation, presets, KV cache, info."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from gptkit.cli import app
from gptkit.config import PRESETS, ModelConfig
from gptkit.errors import GptkitError
from gptkit.model.gpt import GPT, KVCache, sinusoidal_positions
from gptkit.model.size import model_stats

TINY = ModelConfig(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_embd=32)


def test_attention_is_softmax_qk_over_sqrt_dk_v_and_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    attn = model.h[0].attn
    x = torch.randn(2, 7, 32)
    q, k, v = attn.c_attn(x).split(32, dim=2)
    heads = lambda t: t.view(2, 7, 4, 8).transpose(1, 2)  # noqa: E731 (B, nh, T, hs)
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(7, 7, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(attn(x), attn.c_proj(y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_attention_maps_come_from_the_same_forward(pos_encoding):
    """The inspection pass (explicit softmax) gives SDPA's logits, and its weights are causal
    probability rows equal to softmax(QK^T/sqrt(d)) of layer 0."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY.__dict__, "pos_encoding": pos_encoding})).eval()
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        logits, maps = model.attention_maps(idx)
        torch.testing.assert_close(logits, model(idx), atol=1e-5, rtol=1e-5)
        assert maps.shape == (2, 2, 4, 9, 9)  # (n_layer, B, nh, T, T)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 4, 9))
        assert maps.triu(1).abs().max() == 0  # nothing attends to the future
        x0 = model.h[0].ln_1(model._embed(idx, torch.arange(9)))
        q, k, _ = model.h[0].attn._qkv(x0)
        expected = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(
            torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        torch.testing.assert_close(maps[0], expected)
    with pytest.raises(ValueError, match="longer than the context"):
        model.attention_maps(torch.zeros(1, 25, dtype=torch.long))


def test_future_tokens_do_not_change_past_logits():
    model = GPT(TINY).eval()
    idx = torch.randint(0, 97, (1, 12))
    other = idx.clone()
    other[0, 8:] = (other[0, 8:] + 1) % 97
    torch.testing.assert_close(model(idx)[:, :8], model(other)[:, :8])


def test_sinusoidal_positions_follow_the_formula():
    pe = sinusoidal_positions(50, 16)
    pos, i = 37, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    model = GPT(ModelConfig(**{**TINY.to_dict(), "pos_encoding": "sinusoidal"}))
    assert not hasattr(model, "wpe") and "pe" not in model.state_dict()  # fixed: not a parameter


def test_gpt2_initialisation_and_tied_head():
    model = GPT(ModelConfig(vocab_size=5000, block_size=64, n_layer=8, n_head=4, n_embd=256))
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.h[0].attn.c_attn.bias.abs().max().item() == 0


def test_kv_cache_matches_full_forward_with_ragged_rows():
    torch.manual_seed(1)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.allocate(TINY, batch_size=3)
        for b, n in enumerate([4, 9, 12]):  # each row prefilled to its own length
            model(idx[b:b + 1, :n], kv_cache=cache.rows(b, b + 1))
        assert cache.lengths == [4, 9, 12]
        step = model(torch.stack([idx[0, 4:6], idx[1, 9:11], idx[2, 12:14]]), kv_cache=cache)
    for b, n in enumerate([4, 9, 12]):
        torch.testing.assert_close(step[b], full[b, n:n + 2], atol=1e-5, rtol=1e-5)


def test_context_overflow_is_an_error():
    with pytest.raises(ValueError, match="longer than the context"):
        GPT(TINY)(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("name,expected", [("gpt2", 124.4e6), ("gpt2-xl", 1558e6), ("gpt3-small", 125e6),
                                           ("gpt3-xl", 1.3e9), ("gpt3-13b", 13e9), ("gpt3-175b", 175e9)])
def test_preset_sizes(name, expected):
    assert model_stats(PRESETS[name])["params"] == pytest.approx(expected, rel=0.03)


def test_config_errors_are_one_line():
    with pytest.raises(GptkitError, match="n_embd=30 must be divisible by n_head=4"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(GptkitError, match="unknown model config field"):
        ModelConfig.from_dict({"n_layers": 3})


def test_activation_round_trips_and_old_configs_read_as_tanh_gelu():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=16, block_size=8)
    assert cfg.activation == "gelu"  # new models: the exact GELU
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "activation"}  # written before the field existed
    assert ModelConfig.from_dict(old).activation == "gelu_tanh"
    assert PRESETS["gpt2"].activation == PRESETS["gpt3-175b"].activation == "gelu_tanh"
    with pytest.raises(GptkitError, match="activation='relu': expected one of gelu, gelu_tanh, swiglu, relu2"):
        ModelConfig(activation="relu")


def test_version():
    from importlib.metadata import version

    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output == f"gptkit {version('gptkit')} (torch {torch.__version__})\n"


@pytest.mark.parametrize("command, usage", [
    ([], "Usage: gptkit [OPTIONS] COMMAND [ARGS]..."), (["generate"], "Usage: gptkit generate [OPTIONS] CKPT"),
    (["compare"], "Usage: gptkit compare [OPTIONS] CKPTS..."), (["keys", "add"], "Usage: gptkit keys add [OPTIONS] NAME"),
    (["serve"], "Usage: gptkit serve [OPTIONS] CKPT"), (["pretrain"], "Usage: gptkit pretrain [OPTIONS] DATA"),
])
def test_help_reads_as_people_write_it(command, usage):
    """Usage lines name arguments in capitals (Typer 0.29 writes {ckpt}); flags show no <bool>, repeatable
    options their item's type, not <list[str]>."""
    out = CliRunner().invoke(app, [*command, "--help"], prog_name="gptkit", terminal_width=200)
    assert out.exit_code == 0 and usage in out.output, out.output
    assert "<bool>" not in out.output and "list[" not in out.output and "{" not in out.output


def test_info_command():
    runner = CliRunner()
    out = runner.invoke(app, ["info", "--preset", "gpt3-175b"])
    assert out.exit_code == 0 and "174.6B" in out.output
    out = runner.invoke(app, ["info", "--preset", "gpt2"])
    assert "124.4M" in out.output and "training FLOPs/token" in out.output
    out = runner.invoke(app, ["info", "--preset", "gpt5"])
    assert out.exit_code == 2 and "unknown preset 'gpt5'" in out.output
