"""GGUF export: a checkpoint as one file that llama.cpp (and Ollama, LM Studio and the rest built
on it) runs, written with the `gguf` package llama.cpp maintains.

The model goes out through its Hugging Face form (gptkit.checkpoint.hf.hf_form: GPT2LMHeadModel,
or the Llama family for rotary models), so both exports accept and refuse the same models; the
gguf package's own tensor-name table then names each tensor as llama.cpp expects. Two layouts
differ from Hugging Face's: GPT-2's Conv1D matrices go back to (out, in), and llama.cpp's `llama`
architecture rotates interleaved pairs where transformers rotates halves, so the rows of q and k
are permuted (Qwen2/Qwen3 rotate halves in llama.cpp too: no permutation).

The tokenizer is written whole (vocabulary, merges, special tokens, the pre-tokenizer's type by
name, the chat template), because llama.cpp's own converter recognises a pre-tokenizer only by
a hash of known vocabularies and refuses a new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from gptkit.checkpoint.hf import TRANSPOSED, hf_form, open_for_export
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write, atomic_write_text
from gptkit.text.chat import default_chat_template
from gptkit.text.tokenizer import EOT, PLAIN_ROLES, BPETokenizer, ChatTemplate

DTYPES = ("f32", "f16", "bf16", "q8_0")
# Hugging Face architecture -> llama.cpp's (Mistral without a sliding window goes out as Llama)
ARCHS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3"}
# Pre-tokenizers llama.cpp knows by name, as tokenizer.json spells them: the regex of a Split
# before a ByteLevel without its own regex, or GPT-2's ByteLevel regex alone (with or without
# SmolLM's digit splitting). The patterns are those of the models' tokenizer.json files.
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}
# Tensors kept in f32 whatever --dtype says: norms and biases (1-D, tiny, precision-sensitive)
# and learned positions (llama.cpp's converter keeps them so too).
KEEP_F32 = ("position_embd.weight",)


def export_gguf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32", ollama: bool = False,
                force: bool = False) -> dict:
    """Write checkpoint `ckpt` as the GGUF file `out` (and, with ollama, a Modelfile beside it).

    Returns a summary: architecture, dtype, tensor count, file size, tokenizer facts.
    Nothing is written when the model, its tokenizer or the destination cannot be exported.
    """
    import gguf

    out = Path(out)
    if dtype not in DTYPES:
        raise GptkitError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not out.parent.is_dir():
        raise GptkitError(f"{out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise GptkitError(f"{out}: is a folder; give the path of the .gguf file to write")
    modelfile = out.with_suffix(".Modelfile")  # beside it, named after it: several exports may share a folder
    for path in [out] + ([modelfile] if ollama else []):
        if path.exists() and not force:
            raise GptkitError(f"{path}: already exists (--force overwrites it)")
    loaded = open_for_export(ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    template = tokenizer.chat_template or default_chat_template(tokenizer)
    hf_config, state = hf_form(model, tokenizer.special_id(EOT))
    arch = ARCHS.get(hf_config["architectures"][0])
    if arch is None:  # defensive: hf_form only makes the architectures above
        raise GptkitError(f"{ckpt}: architecture {hf_config['architectures'][0]} has no llama.cpp form")
    vocab = gguf_vocab(tokenizer, model.config.vocab_size, str(ckpt))

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(Path(ckpt).resolve().name)
        _write_hparams(writer, arch, model.config, hf_config)
        _write_vocab(writer, vocab, tokenizer, template)
        counts = _write_tensors(writer, arch, state, model.config, dtype)
        writer.add_file_type(_file_type(dtype))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        summary.update(counts)

    summary: dict = {}
    atomic_write(out, write)
    if ollama:
        atomic_write_text(modelfile, ollama_modelfile(out.name, template, tokenizer))
    return {"out": str(out), "architecture": arch, "dtype": dtype, "bytes": out.stat().st_size,
            "params": model.num_params(), "vocab_size": model.config.vocab_size, "pre_tokenizer": vocab["pre"],
            "chat_template": template.kind, "modelfile": str(modelfile) if ollama else None,
            "lora_merged": loaded.meta.is_lora, "notes": notes(model.config, tokenizer), **summary}


def notes(cfg, tokenizer) -> list[str]:
    """What llama.cpp will compute differently from gptkit, said rather than left to be found."""
    out = []
    if cfg.pos_encoding == "learned" and cfg.activation == "gelu":
        out.append("this model uses the exact (erf) GELU; llama.cpp's gpt2 computes the tanh form (from an fp16 "
                   "table): activations differ by up to ~5e-4")
    if cfg.vocab_size > tokenizer.vocab_size:
        out.append(f"ids {tokenizer.vocab_size}..{cfg.vocab_size - 1} are rows beyond the tokenizer: gptkit never "
                   "samples them, llama.cpp may (an untrained row is not unlikely)")
    return out


def _file_type(dtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]



# ---------------------------------------------------------------------------- hyper-parameters
def _write_hparams(writer, arch: str, cfg, hf_config: dict) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
        return
    import gguf

    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    rope = hf_config["rope_parameters"]  # NTK scaling is already folded into this base (hf_llama)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":  # llama.cpp computes YaRN's ramp (betas 32 and 1) and attention scale itself
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


# ---------------------------------------------------------------------------- tokenizer
def gguf_vocab(tokenizer, n_vocab: int, source: str) -> dict:
    """The tokenizer as llama.cpp's BPE vocabulary: tokens by id (padded to the model's vocab_size
    with unused tokens), their types, merges and the pre-tokenizer's name."""
    import gguf

    assert isinstance(tokenizer, BPETokenizer)  # open_for_export refused the others
    spec = json.loads(tokenizer.tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GptkitError(f"{source}: tokenizer.json model type {model.get('type')!r}; llama.cpp's gpt2 vocabulary "
                          "needs a byte-level 'BPE' one")
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    by_id = {i: piece for piece, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if by_id and max(by_id) >= n_vocab:
        raise GptkitError(f"{source}: the tokenizer has token id {max(by_id)} but the model's vocab_size is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # the model's rows beyond the tokenizer (a vocab rounded up for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(spec, source)}


def pre_tokenizer_name(spec: dict, source: str) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer; one line naming it when llama.cpp has none."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex:
            split = steps[0]
            pattern = (split.get("pattern") or {}).get("Regex")
            if split.get("behavior") == "Isolated" and not split.get("invert") and pattern in SPLIT_PATTERNS:
                return SPLIT_PATTERNS[pattern]
    raise GptkitError(f"{source}: tokenizer.json pre_tokenizer {json.dumps(pre)[:160]} is not one llama.cpp knows "
                      "by name (GPT-2's byte-level regex, SmolLM's, Qwen2's or Llama 3's split)")


def _write_vocab(writer, vocab: dict, tokenizer, template: ChatTemplate) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    eot = tokenizer.special_id(EOT)
    end = tokenizer.special_id(template.end) if template.kind != "plain" else None
    eos = end if end is not None else eot
    if eos is not None:
        writer.add_eos_token_id(eos)
    if eot is not None:  # GPT-2's convention: one token begins and ends documents
        writer.add_bos_token_id(eot)
    if end is not None:
        writer.add_eot_token_id(end)
    writer.add_add_bos_token(False)  # gptkit never prepends one: neither may llama.cpp
    writer.add_chat_template(template.jinja())


# ---------------------------------------------------------------------------- tensors
def _write_tensors(writer, arch: str, state: dict[str, torch.Tensor], cfg, dtype: str) -> dict:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)
    counts = {"tensors": 0, "f16_fallback": 0}
    for hf_name, t in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:  # a tensor the table does not know would be silently lost: never
            raise GptkitError(f"tensor {hf_name} has no llama.cpp name for architecture {arch}")
        if arch == "gpt2" and hf_name.endswith(TRANSPOSED):
            t = t.t()  # Conv1D (in, out) back to (out, in), as llama.cpp reads matrices
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            t = interleave_rope_rows(t, cfg.n_head if hf_name.endswith("q_proj.weight") else cfg.kv_heads)
        data = t.float().contiguous().numpy()
        kind = "f32" if data.ndim == 1 or name in KEEP_F32 else dtype
        if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
            kind, counts["f16_fallback"] = "f16", counts["f16_fallback"] + 1  # rows must fill whole 32-blocks
        if kind == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        elif kind in ("bf16", "q8_0"):
            qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
        counts["tensors"] += 1
    return counts


def interleave_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection so that pair i of each head sits in rows (2i, 2i+1)
    instead of (i, i + hs/2): llama.cpp's `llama` rotates adjacent channels, transformers halves."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- Ollama
def ollama_modelfile(gguf_name: str, template: ChatTemplate, tokenizer) -> str:
    """A Modelfile for `ollama create`: the GGUF, the chat template in Ollama's (Go) syntax, and
    the stop strings. An imported model's Jinja template has no general Go translation: Ollama
    then uses the template stored in the GGUF when it recognises it."""
    lines = [f"FROM ./{gguf_name}", ""]
    if template.kind == "chatml":
        lines += ['TEMPLATE """{{- range .Messages }}' + template.start + "{{ .Role }}",
                  "{{ .Content }}" + template.end, "{{ end }}" + template.start + 'assistant', '"""']
        stops = [template.end, EOT]
    elif template.kind == "plain":
        role = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{name}'
                       for i, (r, name) in enumerate(PLAIN_ROLES.items())) + "{{ end }}"
        lines += ['TEMPLATE """{{- range .Messages }}' + role + ": {{ .Content }}", '{{ end }}Assistant:"""']
        stops = [f"\n{name}:" for name in PLAIN_ROLES.values()] + [EOT]
    else:
        lines += ["# TEMPLATE: this model's own (Jinja) chat template is stored in the GGUF file; Ollama uses it",
                  "# when it recognises it, else write the template here in Ollama's syntax."]
        stops = [template.end]
    if template.default_system:
        lines += ["", f"SYSTEM {json.dumps(template.default_system, ensure_ascii=False)}"]
    lines.append("")
    present = [s for s in stops if s == template.end or s.startswith("\n") or tokenizer.special_id(s) is not None]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(present)]
    return "\n".join(lines) + "\n"

