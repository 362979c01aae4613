"""Hugging Face interoperability: GPT-2-family checkpoints in, transformers-loadable folders out;
the Llama family (Llama, Qwen2, Qwen3, Mistral) through gptkit.checkpoint.hf_llama's tables.

Conversion is data. KEY_MAP pairs each Hugging Face key with ours ({i} = layer index),
TRANSPOSED lists the tensors GPT-2 stores as Conv1D (in, out) where we use Linear
(out, in), and CONFIG_MAP pairs the config fields. Everything else is checks: every key
mapped exactly once (missing / unexpected keys are named), shapes asserted by the model,
options with no counterpart rejected with one line naming the field.

Only safetensors, json and torch are needed to read and write the layout; transformers
itself is never imported here (the tests use it to prove parity).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from gptkit.checkpoint import hf_llama
from gptkit.checkpoint.format import load_state, save_checkpoint, tied_keys
from gptkit.checkpoint.hf_llama import check_fields, name_keys
from gptkit.checkpoint.open import open_checkpoint
from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write, atomic_write_json
from gptkit.model.gpt import GPT
from gptkit.model.lora import merge_lora
from gptkit.text.chat import imported_chat_template
from gptkit.text.tokenizer import EOT, load_tokenizer

# Hugging Face key -> gptkit key. GPT2LMHeadModel prefixes the body with "transformer.";
# checkpoints saved from the bare GPT2Model (e.g. the original openai-community/gpt2) do not.
PREFIX = "transformer."
KEY_MAP: dict[str, str] = {
    "transformer.wte.weight": "wte.weight",
    "transformer.wpe.weight": "wpe.weight",
    "transformer.h.{i}.ln_1.weight": "h.{i}.ln_1.weight",
    "transformer.h.{i}.ln_1.bias": "h.{i}.ln_1.bias",
    "transformer.h.{i}.attn.c_attn.weight": "h.{i}.attn.c_attn.weight",
    "transformer.h.{i}.attn.c_attn.bias": "h.{i}.attn.c_attn.bias",
    "transformer.h.{i}.attn.c_proj.weight": "h.{i}.attn.c_proj.weight",
    "transformer.h.{i}.attn.c_proj.bias": "h.{i}.attn.c_proj.bias",
    "transformer.h.{i}.ln_2.weight": "h.{i}.ln_2.weight",
    "transformer.h.{i}.ln_2.bias": "h.{i}.ln_2.bias",
    "transformer.h.{i}.mlp.c_fc.weight": "h.{i}.mlp.c_fc.weight",
    "transformer.h.{i}.mlp.c_fc.bias": "h.{i}.mlp.c_fc.bias",
    "transformer.h.{i}.mlp.c_proj.weight": "h.{i}.mlp.c_proj.weight",
    "transformer.h.{i}.mlp.c_proj.bias": "h.{i}.mlp.c_proj.bias",
    "transformer.ln_f.weight": "ln_f.weight",
    "transformer.ln_f.bias": "ln_f.bias",
}
# Conv1D weights, (in, out) in GPT-2 and (out, in) in nn.Linear (gptkit names).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The head is tied to wte in both models; when a checkpoint stores it, it must equal wte.
HEAD = "lm_head.weight"
# Causal-mask buffers that older transformers versions saved with the weights: not weights.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# Hugging Face config field -> ModelConfig field.
CONFIG_MAP = {
    "vocab_size": "vocab_size",
    "n_positions": "block_size",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "layer_norm_epsilon": "layer_norm_eps",
}
# GPT-2 activation_function -> ModelConfig.activation (gelu_new and gelu_pytorch_tanh both
# compute the tanh approximation; "gelu" is the exact erf GELU), and back for export.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# GPT-2 options our model implements one way only: field -> the values that mean that way.
REQUIRED = {
    "model_type": ("gpt2",),
    "activation_function": tuple(ACTIVATIONS),
    "n_inner": (None,),  # None means 4 * n_embd, our MLP width
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}
# Fixed fields of the exported config.json (the rest comes from CONFIG_MAP and the tokenizer).
EXPORT_FIXED = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "n_inner": None,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "use_cache": True,
    "dtype": "float32",
}
# ModelConfig fields GPT-2 fixes: a model that differs exports to the Llama family (or not at all).
GPT2_SHAPE = {"norm": "layernorm", "n_kv_head": None, "head_size": None, "qk_norm": False, "qkv_bias": None,
              "tie_embeddings": True, "mlp_hidden": None}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "tokenizer.json", "vocab.json", "merges.txt"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ---------------------------------------------------------------------------- key map
def layer_keys(n_layer: int) -> dict[str, str]:
    """KEY_MAP with {i} expanded for every layer: Hugging Face key -> gptkit key."""
    out: dict[str, str] = {}
    for hf, ours in KEY_MAP.items():
        layers = range(n_layer) if "{i}" in hf else [None]
        out.update({hf.format(i=i): ours.format(i=i) for i in layers})
    return out


def hf_to_gptkit(state: dict[str, torch.Tensor], n_layer: int, source: str) -> dict[str, torch.Tensor]:
    """Rename and transpose a GPT-2 state dict into gptkit's, naming missing and unexpected keys."""
    if not any(k.startswith(PREFIX) for k in state):
        state = {(k if k == HEAD else PREFIX + k): v for k, v in state.items()}
    keys = layer_keys(n_layer)
    missing = [k for k in keys if k not in state]
    ignored = {HEAD} | {k for k in state if k.endswith(BUFFER_SUFFIXES)}
    unexpected = sorted(set(state) - set(keys) - ignored)
    if missing or unexpected:
        raise GptkitError(f"{source}: {name_keys('missing', missing)}{'; ' if missing and unexpected else ''}"
                          f"{name_keys('unexpected', unexpected)} for a {n_layer}-layer GPT-2")
    wte = state[PREFIX + "wte.weight"]
    if HEAD in state and not torch.equal(state[HEAD], wte):
        raise GptkitError(f"{source}: {HEAD} differs from wte.weight; only a head tied to the embedding is supported")
    return {ours: _maybe_t(ours, state[hf]) for hf, ours in keys.items()}


def gptkit_to_hf(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """gptkit state dict -> GPT2LMHeadModel's (the tied head left out, as transformers saves it).

    A model built with bias=False exports zero biases: GPT-2 always has them, and zeros
    compute exactly the same function.
    """
    out = {}
    for hf, ours in layer_keys(n_layer).items():
        if ours not in state and ours.endswith(".bias"):
            weight = state[ours.removesuffix("bias") + "weight"]  # Linear (out, in) or LayerNorm (C,)
            out[hf] = torch.zeros(weight.shape[0], dtype=weight.dtype)
        else:
            out[hf] = _maybe_t(ours, state[ours]).contiguous()
    return out


def _maybe_t(key: str, t: torch.Tensor) -> torch.Tensor:
    return t.t() if key.endswith(TRANSPOSED) else t


# ---------------------------------------------------------------------------- config
def config_from_hf(hf: dict, source: str) -> ModelConfig:
    """ModelConfig from a GPT-2 config.json dict; unsupported options are named."""
    check_fields(hf, REQUIRED, CONFIG_MAP, source)
    # Dropout is a training choice, not part of the weights; start from 0 as for inference
    # (GPT-2's three dropout rates have no single counterpart anyway).
    return ModelConfig(**{ours: hf[theirs] for theirs, ours in CONFIG_MAP.items()}, dropout=0.0,
                       activation=ACTIVATIONS[hf.get("activation_function", "gelu_new")])


def config_to_hf(cfg: ModelConfig, eot_id: int | None) -> dict:
    """A GPT2LMHeadModel config.json dict; options GPT-2 cannot express are named."""
    if cfg.pos_encoding != "learned":
        raise GptkitError(f"pos_encoding={cfg.pos_encoding!r} has no GPT-2 equivalent "
                          "(GPT-2 learns its positions); only pos_encoding='learned' exports")
    for field, gpt2 in GPT2_SHAPE.items():
        if getattr(cfg, field) != gpt2:
            raise GptkitError(f"{field}={getattr(cfg, field)!r} has no GPT-2 equivalent (GPT-2: {gpt2!r})")
    out = {theirs: getattr(cfg, ours) for theirs, ours in CONFIG_MAP.items()}
    out.update(EXPORT_FIXED, activation_function=EXPORT_ACTIVATIONS[cfg.activation], resid_pdrop=cfg.dropout,
               embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=eot_id, eos_token_id=eot_id)
    return out


# ---------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a Hugging Face folder and the file it came from (safetensors preferred)."""
    from safetensors.torch import load_file

    path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if path is None:
        raise GptkitError(f"{folder}: no weights found (expected {' or '.join(WEIGHT_FILES)})")
    try:
        if path.name.endswith(".index.json"):  # sharded: the index names each tensor's shard
            shards = sorted(set(_read_json(path)["weight_map"].values()))
            return {k: v for s in shards for k, v in load_file(str(folder / s)).items()}, str(path)
        if path.suffix == ".safetensors":
            return load_file(str(path)), str(path)
        # weights_only: a pickle can run code; GPT-2's .bin holds only tensors in a dict
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except GptkitError:
        raise
    except Exception as e:  # corrupt or truncated files: keep the message to one line
        raise GptkitError(f"{path}: cannot read weights ({_one_line(e)})") from None


def resolve_source(src: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub name, downloaded when huggingface_hub is installed."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.is_absolute() or not HUB_ID.fullmatch(str(src)):  # a path, not "org/name": never hit the network
        raise GptkitError(f"{src}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GptkitError(f"{src}: no such folder (hub names need `pip install huggingface_hub`)") from None
    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, invalid name: all one line
        raise GptkitError(f"{src}: no such folder, and not downloadable from the hub ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    """The first line of a library error (safetensors and the hub raise multi-line messages)."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


# ---------------------------------------------------------------------------- the two commands
def import_hf(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Convert a Hugging Face GPT-2 folder (or hub name) into a gptkit checkpoint at out.

    Returns a summary: source files, parameter count, vocab sizes.
    """
    folder = resolve_source(src)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise GptkitError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf_config = _read_json(config_path)
    llama = hf_config.get("model_type", "gpt2") != "gpt2"  # hf_llama names what it does not support
    cfg = (hf_llama.config_from_hf if llama else config_from_hf)(hf_config, str(config_path))
    tokenizer = load_tokenizer(folder)
    if (folder / "tokenizer_config.json").is_file():  # the model's own chat template, when it has one
        tokenizer.chat_template = imported_chat_template(_read_json(folder / "tokenizer_config.json"))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GptkitError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {cfg.vocab_size}")
    hf_state, weights_path = read_hf_weights(folder)
    model = GPT(cfg)
    if llama:
        expected = {k: v for k, v in model.state_dict().items() if k not in tied_keys(model)}
        state = hf_llama.hf_to_gptkit(hf_state, expected, cfg.n_layer, weights_path)
    else:
        state = hf_to_gptkit(hf_state, cfg.n_layer, weights_path)
    load_state(model, state, source=weights_path)  # asserts every shape against the config
    save_checkpoint(out, model, tokenizer, extra={"imported_from": str(src)})
    return {"source": weights_path, "out": str(out), "params": model.num_params(),
            "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
            "tokenizer_vocab": tokenizer.vocab_size}


def open_for_export(ckpt: str | os.PathLike):
    """A checkpoint opened for export (export-hf, export-gguf): LoRA adapters folded into their
    layers (the exported model computes what the adapter checkpoint did), and a byte-level BPE
    tokenizer, the one kind the exported formats hold."""
    if "@" in str(ckpt) and not Path(ckpt).exists():
        raise GptkitError(f"{ckpt}: export takes the checkpoint itself; quantisation is a way of loading it, "
                          "not a checkpoint (export-gguf --dtype q8_0 writes an 8-bit file)")
    loaded = open_checkpoint(ckpt)
    if loaded.meta.is_lora:
        merge_lora(loaded.model)
    if loaded.tokenizer.kind != "bpe":
        raise GptkitError(f"{ckpt}: a {loaded.tokenizer.kind!r} tokenizer has no tokenizer.json form; "
                          "only 'bpe' tokenizers export (pretrain with --tokenizer bpe)")
    return loaded


def hf_form(model: GPT, eot_id: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The Hugging Face config.json dict and state dict of a model: GPT2LMHeadModel, or the
    Llama family for rotary models. What neither can express is named in one line."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.config.pos_encoding == "rope":  # the later decoders go out as their Llama-family form
        return hf_llama.config_to_hf(model.config, eot_id), hf_llama.gptkit_to_hf(weights, model.config)
    return config_to_hf(model.config, eot_id), gptkit_to_hf(weights, model.config.n_layer)


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write a gptkit checkpoint as a folder transformers loads with no custom code:
    config.json + model.safetensors (GPT2LMHeadModel or the Llama family) and tokenizer.json +
    tokenizer_config.json. A LoRA checkpoint goes out merged.

    Only byte-level BPE tokenizers export (tokenizer.json is their native format); a char or
    tiktoken tokenizer is an error, raised before anything is written.
    """
    from safetensors.torch import save_file

    loaded = open_for_export(ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    eot_id = tokenizer.special_id(EOT)
    hf_config, state = hf_form(model, eot_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # transformers refuses safetensors files without a format tag
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", hf_config)
    atomic_write(out / "tokenizer.json", lambda tmp: tokenizer.tok.save(tmp))
    specials = {"bos_token": EOT, "eos_token": EOT} if eot_id is not None else {}
    # PreTrainedTokenizerFast loads tokenizer.json exactly as saved (no rebuild from vocab/merges)
    chat = {"chat_template": tokenizer.chat_template.jinja()} if tokenizer.chat_template else {}
    atomic_write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                       "model_max_length": model.config.block_size,
                                                       "add_bos_token": False, **specials, **chat})
    atomic_write_json(out / "special_tokens_map.json", specials)
    return {"out": str(out), "architecture": hf_config["architectures"][0], "params": model.num_params(),
            "tensors": len(state),
            "vocab_size": model.config.vocab_size, "tokenizer_vocab": tokenizer.vocab_size,
            "eos_token": EOT if eot_id is not None else None}
