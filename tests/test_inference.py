"""One way to open a checkpoint (checkpoint.load, typed meta) and one engine factory."""

from __future__ import annotations

import copy

import pytest
import torch

from gptkit.checkpoint.open import open_checkpoint
from gptkit.checkpoint.format import save_checkpoint
from gptkit.config import ModelConfig, SampleConfig
from gptkit.errors import GptkitError
from gptkit.inference.engine import Engine
from gptkit.inference.factory import build_engine, eos_ids, open_engine
from gptkit.model.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import EOT, IM_END, CharTokenizer


def _lora_classifier(folder):
    tok = CharTokenizer(sorted(set("abcdefghij ")), [EOT, IM_END])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    lora = LoRAConfig(rank=4)
    apply_lora(model, lora)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):  # trained-looking adapters, so merging them changes the weights
            torch.nn.init.normal_(layer.lora_B, std=0.2)
    save_checkpoint(folder, model, tok, step=3, extra={"lora": lora.to_dict(), "labels": ["no", "yes"]})
    return model, tok


def test_load_gives_model_tokenizer_and_typed_meta(tmp_path):
    _lora_classifier(tmp_path / "run")
    ckpt = open_checkpoint(tmp_path / "run")  # the run folder: its latest step folder
    assert ckpt.meta.path.name.startswith("step-") and ckpt.meta.step == 3
    assert ckpt.meta.is_lora and ckpt.meta.labels == ["no", "yes"] and ckpt.meta.base is None
    assert any(isinstance(m, LoRALinear) for m in ckpt.model.modules())
    assert eos_ids(ckpt.tokenizer) == [ckpt.tokenizer.special_id(EOT), ckpt.tokenizer.special_id(IM_END)]


def test_the_factory_merges_lora_into_a_copy_and_matches_a_merged_model(tmp_path):
    _lora_classifier(tmp_path / "run")
    ckpt = open_checkpoint(tmp_path / "run")
    engine = build_engine(ckpt.model, ckpt.tokenizer, keep_model=True, device="cpu")
    assert not any(isinstance(m, LoRALinear) for m in engine.model.modules())  # int8 would pack merged layers
    assert any(isinstance(m, LoRALinear) for m in ckpt.model.modules())  # the caller's model as loaded
    merged = open_checkpoint(tmp_path / "run").model
    merge_lora(merged)
    plain = Engine(merged, token_bytes=ckpt.tokenizer.token_bytes, eos_ids=eos_ids(ckpt.tokenizer))
    params = SampleConfig(max_tokens=12, temperature=0.0)
    prompt = ckpt.tokenizer.encode("abc ")
    assert engine.generate(prompt, params)[0].token_ids == plain.generate(prompt, params)[0].token_ids
    quantized, _ = open_engine(tmp_path / "run", quantize="int8", device="cpu")
    assert not any(isinstance(m, LoRALinear) for m in quantized.model.modules())


def test_one_device_resolver_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from gptkit.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device().type == "cpu"
    with pytest.raises(GptkitError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(GptkitError, match=r"device 'tpu': expected one of auto, cuda, mps, cpu"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == torch.device("cuda") and resolve_device(index=1) == torch.device("cuda", 1)


def test_fp32_weights_are_packed_only_for_an_engine_that_batches():
    """One row (generate, chat): MKL's matrix-vector product on the plain layout is the faster one;
    several rows (serve): oneDNN's prepacked layout. Both compute the same logits."""
    from gptkit.model.quantize import PackedLinear, _can_pack

    if not _can_pack(torch.float32):
        pytest.skip("oneDNN cannot pack fp32 weights on this CPU")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
    one, eight = Engine(copy.deepcopy(model), max_batch=1), Engine(copy.deepcopy(model), max_batch=8)
    kinds = [{type(m) for m in e.model.modules()} for e in (one, eight)]
    assert PackedLinear not in kinds[0] and torch.nn.Linear in kinds[0]
    assert PackedLinear in kinds[1] and torch.nn.Linear not in kinds[1]
    params = SampleConfig(max_tokens=12, temperature=0)
    assert one.generate([1, 2, 3], params)[0].token_ids == eight.generate([1, 2, 3], params)[0].token_ids
