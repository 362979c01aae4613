"""Hugging Face interoperability for the Llama family of decoders: LlamaForCausalLM (SmolLM2 is
one), Qwen2ForCausalLM, Qwen3ForCausalLM and MistralForCausalLM, in and out.

Conversion is data, as for GPT-2 (gptkit.checkpoint.hf). FAMILIES says what each architecture
fixes; CONFIG_MAP pairs config fields; KEY_MAP pairs tensors one to one, and FUSED lists the
tensors gptkit keeps side by side in one matrix (c_attn = [q; k; v], c_fc = [gate; up]), split
again on export. What the GPT cannot compute exactly (other rope types, sliding windows shorter
than the context, biases on the output projection alone, other activations) is refused in one
line naming the field — never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError


@dataclass(frozen=True)
class Family:
    model_type: str
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v (and nowhere else)
    qk_norm: bool = False  # Qwen3 normalises each head's queries and keys


FAMILIES = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("mistral"),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True),
}
# Hugging Face config field -> ModelConfig field (fields the family's configs all have).
CONFIG_MAP = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "block_size",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "hidden_size": "n_embd",
    "intermediate_size": "mlp_hidden",
    "rms_norm_eps": "layer_norm_eps",
}
# Options with one meaning here: field -> the values that mean it (the first is transformers' default).
REQUIRED = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "num_experts": (None, 0),
}
MODERN = dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False)

KEY_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "wte.weight",
    "model.norm.weight": "ln_f.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "h.{i}.ln_1.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "h.{i}.ln_2.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "h.{i}.attn.c_proj.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "h.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "h.{i}.attn.k_norm.weight",
    "model.layers.{i}.mlp.down_proj.weight": "h.{i}.mlp.c_proj.weight",
}
ATTN = "model.layers.{i}.self_attn."
FUSED: dict[str, tuple[str, ...]] = {
    "h.{i}.attn.c_attn.weight": (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"),
    "h.{i}.attn.c_attn.bias": (ATTN + "q_proj.bias", ATTN + "k_proj.bias", ATTN + "v_proj.bias"),
    "h.{i}.mlp.c_fc.weight": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
}
# Buffers some checkpoints saved with the weights: not weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------- config
def check_fields(hf: dict, required: dict[str, tuple], mapped: dict[str, str], source: str) -> None:
    """One-line errors for a config.json field whose value has no counterpart (transformers' default,
    the first allowed value, counts when the field is absent) and for missing mapped fields."""
    for field, allowed in required.items():
        value = hf.get(field, allowed[0])
        if value not in allowed:
            raise GptkitError(f"{source}: {field}={value!r} is not supported; expected "
                              f"{' or '.join(repr(a) for a in allowed)}")
    absent = [f for f in mapped if f not in hf]
    if absent:
        raise GptkitError(f"{source}: missing field(s) {', '.join(absent)}")


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    """ModelConfig from a Llama-family config.json; what it cannot compute is named."""
    archs = hf.get("architectures") or []
    family = next((FAMILIES[a] for a in archs if a in FAMILIES), None)
    if family is None:
        raise GptkitError(f"{source}: architectures={archs!r} is not supported; expected GPT2LMHeadModel or "
                          f"one of {', '.join(FAMILIES)}")
    check_fields(hf, REQUIRED, CONFIG_MAP, source)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window is not None and window < hf["max_position_embeddings"]:
        raise GptkitError(f"{source}: sliding_window={window} is shorter than max_position_embeddings="
                          f"{hf['max_position_embeddings']}; only attention over the whole context is supported")
    attention_bias = hf.get("attention_bias", False)
    if attention_bias and not family.qkv_bias:  # Llama's flag also puts a bias on o_proj
        raise GptkitError(f"{source}: attention_bias=True (a bias on o_proj) is not supported; expected False")
    scaling, rope = rope_scaling(hf, source)
    fields = {ours: hf[theirs] for theirs, ours in CONFIG_MAP.items()}
    n_head = fields["n_head"]
    head_dim = hf.get("head_dim") or fields["n_embd"] // n_head
    return ModelConfig(**fields, **MODERN, n_kv_head=hf.get("num_key_value_heads") or n_head,
                       head_size=None if head_dim * n_head == fields["n_embd"] else head_dim,
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), **scaling,
                       qk_norm=family.qk_norm,
                       qkv_bias=family.qkv_bias or None, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       dropout=0.0)


def rope_scaling(hf: dict, source: str) -> tuple[dict, dict]:
    """(ModelConfig's rope scaling fields, the rope parameters) of a config.json: transformers 5 keeps
    them in rope_parameters, older files in rope_scaling ("type" for "rope_type")."""
    legacy = hf.get("rope_scaling") or {}  # when both are there, the older field is the one that was edited
    rope = {**(hf.get("rope_parameters") or {}), **legacy}
    where = "rope_scaling" if legacy else "rope_parameters"
    rope_type = legacy.get("rope_type", legacy.get("type")) if legacy else rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn"):
        raise GptkitError(f"{source}: {where}.rope_type={rope_type!r} is not supported; "
                          "expected 'default', 'linear' or 'yarn'")
    if rope_type == "default":
        return {}, rope
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
        raise GptkitError(f"{source}: {where}.factor={factor!r}: expected a number >= 1 for the {rope_type!r} rope type")
    if rope_type == "linear":
        return dict(rope_scaling="linear", rope_factor=float(factor)), rope
    # YaRN as transformers computes it by default; its variants would be approximated: refused
    for key, default in (("beta_fast", 32), ("beta_slow", 1), ("mscale", None), ("mscale_all_dim", None),
                         ("attention_factor", None), ("truncate", True)):
        if rope.get(key, default) not in (default, None):
            raise GptkitError(f"{source}: {where}.{key}={rope[key]!r} is not supported for yarn; expected "
                              f"{default!r} (or absent)")
    trained = rope.get("original_max_position_embeddings") or hf["max_position_embeddings"]
    return dict(rope_scaling="yarn", rope_factor=float(factor), rope_original_context=int(trained)), rope


def config_to_hf(cfg: ModelConfig, eot_id: int | None) -> dict:
    """A Llama-family config.json: Qwen3 with qk_norm, Qwen2 with QKV biases, else Llama."""
    for field, want in MODERN.items():
        if getattr(cfg, field) != want:
            raise GptkitError(f"{field}={getattr(cfg, field)!r} has no Llama-family equivalent; export needs "
                              + ", ".join(f"{k}={v!r}" for k, v in MODERN.items()))
    arch = "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    if cfg.qk_norm and cfg.qkv_bias:
        raise GptkitError("qk_norm with qkv_bias has no Llama-family equivalent (Qwen3 has no QKV biases)")
    out = {theirs: getattr(cfg, ours) for theirs, ours in CONFIG_MAP.items()}
    out["intermediate_size"] = cfg.hidden_dim
    rope = _rope_parameters(cfg)
    out.update(architectures=[arch], model_type=FAMILIES[arch].model_type, hidden_act="silu",
               num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rope_theta=rope["rope_theta"],
               rope_parameters=rope,
               tie_word_embeddings=cfg.tie_embeddings, attention_bias=bool(cfg.qkv_bias),
               rope_scaling=None, use_cache=True, dtype="float32", bos_token_id=eot_id, eos_token_id=eot_id)
    if arch == "LlamaForCausalLM":
        out["mlp_bias"] = False
    return out


def _rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' rope_parameters: linear scaling as its own type; NTK, a fixed larger base, as the
    default type with that base (the same angles)."""
    if cfg.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_factor, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "yarn":
        trained = cfg.rope_original_context or round(cfg.block_size / cfg.rope_factor)
        return {"rope_type": "yarn", "factor": cfg.rope_factor, "rope_theta": cfg.rope_theta,
                "original_max_position_embeddings": trained}
    theta = cfg.rope_theta * (cfg.rope_factor ** (cfg.head_dim / (cfg.head_dim - 2)) if cfg.rope_scaling == "ntk" else 1)
    return {"rope_type": "default", "rope_theta": theta}


# ---------------------------------------------------------------------------- weights
def _expand(template: str, n_layer: int) -> list[tuple[int | None, str]]:
    return [(i, template.format(i=i)) for i in range(n_layer)] if "{i}" in template else [(None, template)]


def hf_to_gptkit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], n_layer: int,
                 source: str) -> dict[str, torch.Tensor]:
    """Rename and fuse a Llama-family state dict into the keys of `expected` (the GPT built from
    the config's state dict); missing and unexpected keys are named."""
    out, used, missing = {}, set(), []
    direct = {ours: theirs for t_hf, t_ours in KEY_MAP.items()
              for (i, theirs), (_, ours) in zip(_expand(t_hf, n_layer), _expand(t_ours, n_layer))}
    fused = {t_ours.format(i=i): tuple(p.format(i=i) for p in parts)
             for t_ours, parts in FUSED.items() for i, _ in _expand(t_ours, n_layer)}
    for key in expected:
        sources = (direct[key],) if key in direct else fused.get(key, (key,))
        have = [s for s in sources if s in state]
        if len(have) != len(sources):
            missing += [s for s in sources if s not in state]
            continue
        out[key] = torch.cat([state[s] for s in sources]) if len(sources) > 1 else state[sources[0]]
        used.update(sources)
    unexpected = sorted(k for k in set(state) - used if not k.endswith(IGNORED_SUFFIXES)
                        and not (k == "lm_head.weight" and "lm_head.weight" not in expected))
    if missing or unexpected:
        raise GptkitError(f"{source}: {name_keys('missing', missing)}{'; ' if missing and unexpected else ''}"
                          f"{name_keys('unexpected', unexpected)}")
    return out


def gptkit_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """gptkit state dict -> the family's (fused matrices split; a tied head left out)."""
    hs = cfg.head_dim
    sizes = {"attn.c_attn": [cfg.n_head * hs, cfg.kv_heads * hs, cfg.kv_heads * hs],
             "mlp.c_fc": [cfg.hidden_dim, cfg.hidden_dim]}
    out = {}
    for t_hf, t_ours in KEY_MAP.items():
        for (_, theirs), (_, ours) in zip(_expand(t_hf, cfg.n_layer), _expand(t_ours, cfg.n_layer)):
            if ours in state:
                out[theirs] = state[ours].contiguous()
    for t_ours, parts in FUSED.items():
        for i, ours in _expand(t_ours, cfg.n_layer):
            if ours in state:
                split = next(v for k, v in sizes.items() if f".{k}." in f".{ours}")
                for name, piece in zip(parts, state[ours].split(split)):
                    out[name.format(i=i)] = piece.contiguous()
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def name_keys(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"{what} key(s) {', '.join(keys[:5])}{more}"
