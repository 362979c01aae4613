"""Hugging Face parity: import a random GPT2LMHeadModel, export gptkit checkpoints, compare
logits, greedy samples and tokenizer ids with transformers. Everything is built locally."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer  # noqa: E402
from gptkit.checkpoint.format import save_checkpoint  # noqa: E402
from gptkit.errors import GptkitError  # noqa: E402
from gptkit.config import ModelConfig  # noqa: E402
from gptkit.checkpoint.hf import export_hf, import_hf  # noqa: E402
from gptkit.model.gpt import GPT, KVCache  # noqa: E402
from gptkit.text.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402

TOL = 1e-4
VOCAB = 1000
MIXED = "Hello, world! 你好，世界。 Emoji: 🙂🚀👩‍💻\ndef add(a, b):\n    return a + b  # ok<|endoftext|>"
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "机器学习很有趣，我们一起学习吧。" * 3,
          "for i in range(10):\n    print(i ** 2)\n" * 3, "Emoji 🙂🚀 are bytes too 🎉" * 3]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS * 20, vocab_size=500)


@pytest.fixture(scope="module")
def hf_model() -> "transformers.GPT2LMHeadModel":
    # At GPT-2's init (std 0.02) a random model repeats one token forever, so greedy parity would
    # prove little; std 0.3 gives varied samples whose top-2 logits still differ by > 1e-3.
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=96, vocab_size=VOCAB, n_positions=128,
                                  initializer_range=0.3, bos_token_id=None, eos_token_id=None)  # no early stop
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model, bpe) -> Path:
    """A Hugging Face folder: config.json + model.safetensors + GPT-2's vocab.json / merges.txt."""
    folder = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(folder)
    bpe.tok.model.save(str(folder))  # writes vocab.json and merges.txt
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf_dir) -> tuple[GPT, Path]:
    out = tmp_path_factory.mktemp("ckpt")
    import_hf(hf_dir, out)
    return open_checkpoint(out).model, out


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def gptkit_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


@torch.no_grad()
def greedy(model: GPT, idx: torch.Tensor, n: int, cached: bool) -> torch.Tensor:
    """n greedy tokens after idx: recomputing the whole sequence each step, or with a KV cache."""
    if not cached:
        for _ in range(n):
            idx = torch.cat([idx, model(idx, last_only=True)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx
    cache = KVCache.allocate(model.config, idx.shape[0], idx.shape[1] + n)
    logits, out = model(idx, kv_cache=cache, last_only=True), [idx]
    for _ in range(n):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = model(out[-1], kv_cache=cache)
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------- import
@pytest.mark.parametrize("shape", [(4, 128), (3, 17), (1, 1)], ids=["full-context", "short", "one-token"])
def test_import_logits_match_transformers(imported, hf_model, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    idx = torch.randint(0, VOCAB, shape, generator=gen)  # every row a different prompt
    diff = max_diff(gptkit_logits(imported[0], idx), hf_logits(hf_model, idx))
    print(f"import {shape}: max abs logit diff {diff:.2e}")
    assert diff <= TOL


def test_import_cached_prefill_and_decode_match_transformers(imported, hf_model):
    model, idx = imported[0], torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = KVCache.allocate(model.config, 2, 40)
    with torch.no_grad():
        steps = [model(idx[:, :30], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(30, 40)]
    assert max_diff(torch.cat(steps, dim=1), hf_logits(hf_model, idx)) <= TOL


def test_greedy_generation_matches_transformers(imported, hf_model):
    prompts = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32,
                                     do_sample=False, pad_token_id=0)
    assert expected.shape == (3, 40)
    assert all(len(set(row[8:].tolist())) > 10 for row in expected)  # varied, not one repeated token
    assert torch.equal(greedy(imported[0], prompts, 32, cached=False), expected)
    assert torch.equal(greedy(imported[0], prompts, 32, cached=True), expected)


def test_greedy_generation_through_engine_matches_transformers(imported, hf_model):
    engine_mod = pytest.importorskip("gptkit.inference.engine")
    from gptkit.config import SampleConfig

    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                     do_sample=False, pad_token_id=0)[0, 8:].tolist()
    engine = engine_mod.Engine(imported[0], max_batch=1, eos_ids=[])
    [completion] = engine.generate(prompt[0].tolist(), SampleConfig(max_tokens=32, temperature=0.0))
    assert completion.token_ids == expected


def test_import_keeps_the_tokenizer(imported, bpe):
    assert open_tokenizer(imported[1]).encode(MIXED) == bpe.encode(MIXED)


def test_import_pytorch_model_bin_with_head_and_mask_buffers(tmp_path, hf_dir, hf_model, bpe):
    """The legacy layout: a pickled state dict that also stores the tied head and the causal-mask
    buffers old transformers versions saved, next to a tokenizer.json."""
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((hf_dir / "config.json").read_text())
    state = dict(hf_model.state_dict())
    assert "lm_head.weight" in state
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    torch.save(state, src / "pytorch_model.bin")
    bpe.tok.save(str(src / "tokenizer.json"))
    import_hf(src, tmp_path / "ckpt")
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(4))
    assert max_diff(gptkit_logits(open_checkpoint(tmp_path / "ckpt").model, idx), hf_logits(hf_model, idx)) <= TOL


def _copy_with_weights(tmp_path: Path, hf_dir: Path, edit) -> Path:
    """A copy of hf_dir whose weights went through edit(state) -> state."""
    src = tmp_path / "copy"
    src.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (src / name).write_text((hf_dir / name).read_text())
    save_file(edit(load_file(str(hf_dir / "model.safetensors"))), str(src / "model.safetensors"))
    return src


def test_import_bare_gpt2model_keys(tmp_path, hf_dir, hf_model):
    """Checkpoints saved from GPT2Model (the original gpt2 on the hub) lack the "transformer." prefix."""
    src = _copy_with_weights(tmp_path, hf_dir, lambda s: {k.removeprefix("transformer."): v for k, v in s.items()})
    import_hf(src, tmp_path / "ckpt")
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(8))
    assert max_diff(gptkit_logits(open_checkpoint(tmp_path / "ckpt").model, idx), hf_logits(hf_model, idx)) <= TOL


def test_import_names_a_missing_key(tmp_path, hf_dir):
    src = _copy_with_weights(tmp_path, hf_dir, lambda s: {k: v for k, v in s.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    with pytest.raises(GptkitError, match=r"missing key\(s\) transformer\.h\.1\.mlp\.c_fc\.bias"):
        import_hf(src, tmp_path / "out")


def test_import_names_an_unexpected_key(tmp_path, hf_dir):
    src = _copy_with_weights(tmp_path, hf_dir, lambda s: {**s, "transformer.h.3.ln_1.weight": torch.ones(96)})
    with pytest.raises(GptkitError, match=r"unexpected key\(s\) transformer\.h\.3\.ln_1\.weight"):
        import_hf(src, tmp_path / "out")


def test_import_names_a_misshapen_tensor(tmp_path, hf_dir):
    src = _copy_with_weights(tmp_path, hf_dir, lambda s: {**s, "transformer.wpe.weight": s["transformer.wpe.weight"][:64]})
    with pytest.raises(GptkitError, match=r"wpe\.weight has shape \(64, 96\), expected \(128, 96\)"):
        import_hf(src, tmp_path / "out")


def test_import_rejects_an_unsupported_activation(tmp_path, hf_dir):
    src = _copy_with_weights(tmp_path, hf_dir, lambda s: s)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(GptkitError, match=r"activation_function='relu' is not supported"):
        import_hf(src, tmp_path / "out")


# ------------------------------------------------------------------------- export
def test_export_of_an_import_restores_the_weights_and_logits(tmp_path, imported, hf_model):
    export_hf(imported[1], tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    original = hf_model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, original[k]), k  # HF -> gptkit -> HF is lossless
    idx = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(5))
    diff = max_diff(hf_logits(reloaded, idx), gptkit_logits(imported[0], idx))
    print(f"export of import: max abs logit diff {diff:.2e}")
    assert diff <= TOL


def native_ckpt_with(folder: Path, bpe, activation: str) -> Path:
    """A gptkit-built model (bias=False, so the zero-bias fallback is exercised) with its tokenizer.
    Weights are scaled to std ~0.3 so that the two GELUs give logits far more than TOL apart."""
    torch.manual_seed(6)
    cfg = ModelConfig(vocab_size=bpe.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, bias=False,
                      activation=activation)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(15)
    return save_checkpoint(folder, model, bpe)


@pytest.fixture(scope="module")
def native_ckpt(tmp_path_factory, bpe) -> Path:
    return native_ckpt_with(tmp_path_factory.mktemp("native"), bpe, "gelu")


@pytest.mark.parametrize("activation,hf_name", [("gelu", "gelu"), ("gelu_tanh", "gelu_new")])
def test_export_native_model_loads_in_transformers_with_equal_logits(tmp_path, bpe, activation, hf_name):
    ckpt = native_ckpt_with(tmp_path / "ckpt", bpe, activation)
    export_hf(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == hf_name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    model = open_checkpoint(ckpt).model
    idx = torch.randint(0, model.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(7))
    diff = max_diff(hf_logits(reloaded, idx), gptkit_logits(model, idx))
    print(f"export native ({activation}): max abs logit diff {diff:.2e}")
    assert diff <= TOL
    # the test can tell the two activations apart: the other GELU is far off
    other = GPT(dataclasses.replace(model.config, activation="gelu_tanh" if activation == "gelu" else "gelu"))
    other.load_state_dict(model.state_dict())
    assert max_diff(gptkit_logits(other.eval(), idx), gptkit_logits(model, idx)) > 100 * TOL


def test_import_exact_gelu_model_matches_transformers(tmp_path, hf_dir):
    src = _copy_with_weights(tmp_path, hf_dir, lambda s: s)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "activation_function": "gelu"}))
    import_hf(src, tmp_path / "out")
    model = open_checkpoint(tmp_path / "out").model
    assert model.config.activation == "gelu"
    reference = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    idx = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(8))
    assert max_diff(hf_logits(reference, idx), gptkit_logits(model, idx)) <= TOL


def test_exported_tokenizer_encodes_mixed_text_to_the_same_ids(tmp_path, native_ckpt, bpe):
    export_hf(native_ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(MIXED)["input_ids"] == bpe.encode(MIXED)
    assert hf_tok.decode(bpe.encode(MIXED)) == MIXED
    assert (hf_tok.eos_token, hf_tok.bos_token) == ("<|endoftext|>", "<|endoftext|>")
    assert hf_tok.eos_token_id == bpe.eot_id


def test_export_rejects_sinusoidal_positions(tmp_path, bpe):
    cfg = ModelConfig(vocab_size=bpe.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16, pos_encoding="sinusoidal")
    ckpt = save_checkpoint(tmp_path / "ckpt", GPT(cfg), bpe)
    with pytest.raises(GptkitError, match=r"pos_encoding='sinusoidal' has no GPT-2 equivalent"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # checked before anything is written


def test_export_rejects_a_char_tokenizer(tmp_path):
    tok = CharTokenizer.train(["abc"])
    ckpt = save_checkpoint(tmp_path / "ckpt", GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1,
                                                              n_head=1, n_embd=8)), tok)
    with pytest.raises(GptkitError, match=r"'char' tokenizer has no tokenizer.json form"):
        export_hf(ckpt, tmp_path / "hf")


# ------------------------------------------------------------------------- CLI
def test_cli_import_and_export(tmp_path, hf_dir):
    from typer.testing import CliRunner

    from gptkit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["import-hf", str(hf_dir), str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "imported" in result.output and "3 layers" in result.output
    result = runner.invoke(app, ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "model.safetensors").is_file() and "exported" in result.output


def test_cli_bad_source_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "gptkit", "import-hf", str(missing), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {missing}: no such folder"
