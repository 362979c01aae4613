"""Typed configuration: the model shape (with presets), training runs and sampling.

Presets are plain data. Nothing here imports torch, so `gptkit info` and the CLI's
help stay fast.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from gptkit.errors import GptkitError


def option(default, help: str):
    """A config field and its help text, declared once: the CLI reads both (gptkit.cli.common)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    # vocabulary and context
    vocab_size: int = option(50257, "vocabulary size (pretrain takes it from the data's tokenizer)")
    block_size: int = option(1024, "context length: the longest sequence the model attends over")
    # shape
    n_layer: int = option(12, "layers")
    n_head: int = option(12, "attention (query) heads")
    n_embd: int = option(768, "width of the residual stream")
    # options: the defaults are GPT-2's; rope + rmsnorm + swiglu + n_kv_head are the Llama family's.
    # "gelu" is the exact (erf) GELU, "gelu_tanh" GPT-2's tanh approximation. The exact one is
    # the default because torch's CPU kernel for it is ~5x faster (fwd+bwd 0.34 vs 1.6 ms on a
    # 768x512 activation here); GPT-2/GPT-3 presets and imported GPT-2 models use "gelu_tanh".
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = option(
        "learned", "positions: learned | sinusoidal | rope (rotary, on queries and keys)")
    rope_theta: float = option(10000.0, "rotary base: pair i of a head turns by position * theta^(-2i/head_dim)")
    rope_scaling: Literal["none", "linear", "ntk", "yarn"] = option(
        "none", "a context rope_factor times the trained one: linear divides positions by it (fine-tune after); "
                "ntk raises theta instead (often usable without fine-tuning); yarn divides only the slow pairs' "
                "angles, keeps the fast ones, and scales attention (Qwen's long-context setting)")
    rope_factor: float = option(1.0, "how much longer a context --rope-scaling stretches the positions over")
    rope_original_context: int | None = option(
        None, "yarn: the context the model was trained with (default: block_size / rope_factor)")
    activation: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = option(
        "gelu", "MLP: gelu | gelu_tanh (GPT-2) | swiglu (Llama's gated MLP) | relu2 (relu squared)")
    mlp_hidden: int | None = option(None, "the MLP's inner width (default: 4 * n_embd)")
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", "layernorm | rmsnorm")
    n_kv_head: int | None = option(None, "key/value heads (default: n_head); fewer: grouped-query, 1: multi-query")
    head_size: int | None = option(None, "per-head width (default: n_embd // n_head)")
    qk_norm: bool = option(False, "RMSNorm on each head's queries and keys (Qwen3)")
    dropout: float = option(0.0, "dropout probability")
    bias: bool = option(True, "biases in every Linear and LayerNorm, as GPT-2")
    qkv_bias: bool | None = option(None, "biases on the query/key/value projection alone (default: as --bias)")
    tie_embeddings: bool = option(True, "the LM head is the token embedding, as GPT-2")
    layer_norm_eps: float = option(1e-5, "epsilon of every norm")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise GptkitError(f"{name}={getattr(self, name)} must be positive")
        if self.head_size is None and self.n_embd % self.n_head:
            raise GptkitError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and not (0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0):
            raise GptkitError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        for name, allowed in (("pos_encoding", ("learned", "sinusoidal", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("activation", ("gelu", "gelu_tanh", "swiglu", "relu2"))):
            if getattr(self, name) not in allowed:
                raise GptkitError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.rope_scaling not in ("none", "linear", "ntk", "yarn"):
            raise GptkitError(f"rope_scaling={self.rope_scaling!r}: expected one of none, linear, ntk, yarn")
        if self.rope_original_context is not None and (self.rope_scaling != "yarn" or self.rope_original_context < 1):
            raise GptkitError(f"rope_original_context={self.rope_original_context}: expected a positive context, "
                              "with rope_scaling='yarn' only")
        if self.rope_factor < 1 or (self.rope_scaling == "none" and self.rope_factor != 1):
            raise GptkitError(f"rope_factor={self.rope_factor}: expected >= 1, and 1 with rope_scaling='none'")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise GptkitError(f"rotary positions need an even head width, not {self.head_dim}")
        for name in ("mlp_hidden", "head_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise GptkitError(f"{name}={getattr(self, name)} must be positive")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GptkitError(f"{where}: unknown model config field(s): {', '.join(sorted(unknown))}")
        check_types(cls, d, where)
        # Checkpoints written before `activation` existed were all trained with the tanh GELU.
        return cls(**{"activation": "gelu_tanh", **d})


def check_types(cls, d: dict, where: str) -> None:
    """GptkitError for a field of d whose JSON type does not fit cls's annotation (e.g. a
    string for an int), before it can fail deep inside with a traceback."""
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        if name in hints and not _fits(value, hints[name]):
            raise GptkitError(f"{where}: field {name!r} is {value!r}, expected {_describe(hints[name])}")


def _fits(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> ModelConfig:
    return ModelConfig(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       activation="gelu_tanh")


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> ModelConfig:
    return ModelConfig(vocab_size=50257, block_size=2048, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       activation="gelu_tanh")


PRESETS: dict[str, ModelConfig] = {
    # small sizes that train on a laptop CPU
    "tiny": ModelConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "mini": ModelConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=192),
    "small": ModelConfig(vocab_size=16384, block_size=512, n_layer=8, n_head=8, n_embd=384),
    # the GPT-2 family (Radford et al. 2019)
    "gpt2": _gpt2(12, 12, 768),  # 124M
    "gpt2-medium": _gpt2(24, 16, 1024),  # 355M
    "gpt2-large": _gpt2(36, 20, 1280),  # 774M
    "gpt2-xl": _gpt2(48, 25, 1600),  # 1558M
    # the GPT-3 family, Table 2.1 of Brown et al. 2020 (n_layer, d_model, n_heads)
    "gpt3-small": _gpt3(12, 768, 12),  # 125M
    "gpt3-medium": _gpt3(24, 1024, 16),  # 350M
    "gpt3-large": _gpt3(24, 1536, 16),  # 760M
    # The table gives XL 24 heads of d_head 128, which do not tile d_model 2048: 16 x 128 do.
    "gpt3-xl": _gpt3(24, 2048, 16),  # 1.3B
    "gpt3-2.7b": _gpt3(32, 2560, 32),  # 2.7B
    "gpt3-6.7b": _gpt3(32, 4096, 32),  # 6.7B
    # The table prints d_model=5140, which 40 heads cannot divide; 40 x d_head 128 = 5120.
    "gpt3-13b": _gpt3(40, 5120, 40),  # 13B
    "gpt3-175b": _gpt3(96, 12288, 96),  # 175B
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise GptkitError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


@dataclass
class TrainConfig:
    """One training run: pretraining and every kind of fine-tuning share these."""

    out_dir: str = option("runs/model", "checkpoint folder to write")
    # optimisation
    max_steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(6e-4, "peak learning rate")
    min_lr: float | None = option(None, "final learning rate (default lr/10)")
    warmup_steps: int = option(100, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip gradient norm (0 = off)")
    optimizer: Literal["auto", "adamw", "muon"] = option(
        "auto", "auto | adamw | muon: muon = Muon for the blocks' matrices and AdamW for the rest; auto = muon, "
                "or adamw under --strategy fsdp")
    muon_lr_scale: float = option(1.0, "Muon's lr relative to lr (AdamW's)")
    muon_momentum: float = option(0.95, "Muon's momentum")
    muon_ns: Literal["jordan", "polar-express"] = option(
        "jordan", "jordan | polar-express: Muon's Newton-Schulz polynomials (Jordan's, as torch.optim.Muon; Polar "
                  "Express's, one per iteration: 3 of them trained about as well as 5 of Jordan's, BENCHMARKS.md)")
    muon_ns_steps: int = option(5, "Newton-Schulz iterations per Muon step (1 to 5)")
    # evaluation, logging and checkpoints
    eval_interval: int = option(250, "evaluate and checkpoint every N steps")
    eval_batches: int = option(20, "validation batches per evaluation")
    log_interval: int = option(10, "write train metrics every N steps")
    ckpt_interval: int = option(0, "also checkpoint every N steps (0: only at evaluations and at the end)")
    keep: int = option(2, "complete checkpoints (step folders) to keep; older ones are removed after each save")
    stop_at: int | None = option(None, "stop (with a checkpoint) after this step, keeping max_steps' schedule; "
                                       "--resume later")
    # speed
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "auto | float32 | bfloat16 (autocast)")
    compile: bool = option(False, "torch.compile the model")
    # several processes (torchrun): see gptkit.training.distributed
    strategy: Literal["ddp", "fsdp"] = option("ddp", "ddp | fsdp: how several torchrun processes share the model "
                                                     "(fsdp shards weights, grads and AdamW state)")
    activation_checkpointing: bool = option(False, "recompute block activations in the backward pass (less "
                                                   "memory, ~1/3 more compute)")
    seed: int = option(1337, "random seed")
    progress: bool = option(True, "a progress bar on a terminal")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "keep"):
            if getattr(self, name) < 1:
                raise GptkitError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise GptkitError(f"lr={self.lr} must be positive")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.optimizer not in ("auto", "adamw", "muon"):
            raise GptkitError(f"optimizer={self.optimizer!r}: expected 'auto', 'adamw' or 'muon'")
        if self.muon_ns not in ("jordan", "polar-express"):
            raise GptkitError(f"muon_ns={self.muon_ns!r}: expected 'jordan' or 'polar-express'")
        if not 1 <= self.muon_ns_steps <= 5:  # Polar Express's polynomials were computed for 5 iterations
            raise GptkitError(f"muon_ns_steps={self.muon_ns_steps} must be between 1 and 5")
        if self.strategy not in ("ddp", "fsdp"):
            raise GptkitError(f"strategy={self.strategy!r}: expected 'ddp' or 'fsdp'")
        if self.optimizer == "auto":  # Muon reaches a loss in fewer steps (BENCHMARKS.md) but needs whole matrices
            self.optimizer = "adamw" if self.strategy == "fsdp" else "muon"
        if self.optimizer == "muon" and self.strategy == "fsdp":
            raise GptkitError("--optimizer muon does not run with --strategy fsdp (Muon orthogonalizes whole "
                              "matrices, FSDP shards them); use --strategy ddp or --optimizer adamw")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """TrainConfig with fine-tuning's defaults: a short run from a trained model, at a lower peak
    learning rate, without weight decay."""

    out_dir: str = option("runs/finetune", "checkpoint folder to write")
    max_steps: int = option(500, "optimizer steps")
    lr: float = option(3e-4, "peak learning rate")
    warmup_steps: int = option(20, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    eval_interval: int = option(100, "evaluate and checkpoint every N steps")
    eval_batches: int = option(10, "validation batches per task per evaluation")


# Sampling defaults: one per option for `gptkit generate`, `gptkit chat`, the server and every
# SampleConfig (docs/sampling.md). Temperature and top_p are OpenAI's, so a request that leaves them
# out means the same here as there. Evaluation scores greedily (0) and the demo shows 0.7 with top-k 40
# on purpose; both say so where they do it.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # off
# Tokens generated when none are asked for, by generate, chat and SampleConfig; never more than the
# context leaves. The server follows OpenAI's API instead: 16 for /v1/completions, the rest of the
# context for /v1/chat/completions (gptkit.server.schemas).
DEFAULT_MAX_TOKENS = 200
ANSWER_MAX_TOKENS = 64  # the longest task answer evaluate and compare generate (greedily)


@dataclass
class SampleConfig:
    """Per-request sampling parameters, shared by generate, chat and the server."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int = DEFAULT_TOP_K  # 0 = off
    top_p: float = DEFAULT_TOP_P
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: chosen token's logprob and the top k
    grammar: str | None = None  # an llguidance grammar the output must match (structured outputs)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise GptkitError(f"max_tokens={self.max_tokens} must be >= 0")
        if self.temperature < 0:
            raise GptkitError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise GptkitError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise GptkitError(f"top_k={self.top_k} must be >= 0")
