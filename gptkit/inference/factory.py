"""One engine factory for every command that runs a model: generate, chat, serve, evaluate, compare, probe and the demo.

It owns what each used to decide on its own: the device (the GPU when there is one), the
dtype, the ids that end a generation (<|endoftext|> and <|im_end|>), the vocabulary limit
(ids the tokenizer can decode), LoRA (merged before the engine packs the weights, so int8
quantizes the merged layers instead of leaving LoRA layers in float) and quantization.
"""

from __future__ import annotations

import copy
import os

import torch

from gptkit.checkpoint.open import Checkpoint, open_checkpoint
from gptkit.device import resolve_device
from gptkit.errors import GptkitError
from gptkit.inference.constrain import GrammarVocab
from gptkit.inference.engine import Engine
from gptkit.model.lora import merge_lora
from gptkit.text.tokenizer import EOT, IM_END, Tokenizer

DTYPES = ("float32", "bfloat16")


def eos_ids(tokenizer: Tokenizer) -> list[int]:
    """The special tokens that end a generation, where the tokenizer has them: <|endoftext|>,
    <|im_end|>, and an imported chat template's end-of-turn token (Llama 3's <|eot_id|>)."""
    names = [EOT, IM_END] + ([tokenizer.chat_template.end] if tokenizer.chat_template else [])
    return sorted({i for t in names if (i := tokenizer.special_id(t)) is not None})


def build_engine(model: torch.nn.Module, tokenizer: Tokenizer, *, max_batch: int = 8, quantize: str | None = None,
                 dtype: str = "float32", device: str | torch.device | None = "auto", keep_model: bool = False,
                 stop_at_eos: bool = True, prefix_cache_mb: float = 0) -> Engine:
    """The engine for a loaded model, on `device` (gptkit.device: auto = CUDA, MPS, then CPU). The
    engine packs (and may quantize) the layers in place: with keep_model the caller's model is left
    as it was and the engine gets a copy. stop_at_eos=False: every request generates exactly the
    tokens it asks for (speed measurements). prefix_cache_mb: KV entries of prompt prefixes kept for
    later requests that start alike (gptkit/inference/prefix_cache.py); 0: none."""

    if dtype not in DTYPES:
        raise GptkitError(f"--dtype {dtype!r}: expected {' or '.join(DTYPES)}")
    model = copy.deepcopy(model) if keep_model else model
    merge_lora(model)  # a no-op without LoRA layers
    eos = eos_ids(tokenizer)
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
    grammar_vocab = GrammarVocab(tokenizer.token_bytes, lambda s: tokenizer.encode(s, special=False), vocab, eos,
                                 list(tokenizer.special_tokens.values()))  # built when a request first uses it
    if prefix_cache_mb < 0:
        raise GptkitError(f"--prefix-cache-mb {prefix_cache_mb}: expected 0 (off) or more")
    return Engine(model, max_batch=max_batch, token_bytes=tokenizer.token_bytes, eos_ids=eos if stop_at_eos else [],
                  dtype=getattr(torch, dtype), quantize=quantize, device=resolve_device(device),
                  vocab_size=tokenizer.vocab_size, grammar_vocab=grammar_vocab,
                  prefix_cache_bytes=int(prefix_cache_mb * 2**20))


def open_engine(folder: str | os.PathLike, **kw) -> tuple[Engine, Checkpoint]:
    """Open a checkpoint (any folder `open_checkpoint` takes) into the engine."""
    ckpt = open_checkpoint(folder)
    return build_engine(ckpt.model, ckpt.tokenizer, **kw), ckpt
