"""Sizes and costs of a model shape, computed on the meta device (nothing is allocated)."""

from __future__ import annotations

import torch

from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT


def model_stats(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.num_params()
    n_non_emb = model.num_params(non_embedding=True)
    # PaLM appendix B: 6N for the matmuls forward+backward, plus attention scores 12·L·d·T.
    flops = 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return {
        "params": n,
        "non_embedding_params": n_non_emb,
        "train_flops_per_token": flops,
        "forward_flops_per_token": flops // 3,  # inference: 2N + 4·L·d·T, a third of training's
        "weights_bytes_fp32": 4 * n,
        "weights_bytes_bf16": 2 * n,
        "grad_bytes_fp32": 4 * n,
        "adamw_state_bytes": 8 * n,  # exp_avg and exp_avg_sq in fp32
        # a key and a value per layer and KV head: grouped-query attention divides it by n_head / n_kv_head
        "kv_cache_bytes_per_token_fp32": 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * 4,
    }


def per_device_memory(cfg: ModelConfig, world_size: int) -> dict[str, dict[str, int]]:
    """Bytes per device of training state (fp32 weights, fp32 grads, AdamW's two fp32 moments)
    under DDP and FSDP across world_size processes. Activations are not included: they depend
    on batch size, context and activation checkpointing, not on the strategy.

    FSDP holds 1/world_size of each, plus the full weights it gathers for compute: the
    embeddings/final norm (the root group) and two blocks (the current one and the prefetched
    next), in fp32 (half that with bf16 mixed precision)."""
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.num_params()
    block = sum(p.numel() for p in model.h[0].parameters())
    gathered = 4 * (n - cfg.n_layer * block + min(2, cfg.n_layer) * block)
    ddp = {"weights": 4 * n, "grads": 4 * n, "adamw": 8 * n, "gathered": 0}
    fsdp = {k: -(-v // world_size) for k, v in ddp.items()} | {"gathered": gathered if world_size > 1 else 0}
    return {name: {**d, "total": sum(d.values())} for name, d in (("ddp", ddp), ("fsdp", fsdp))}


def format_per_device(mem: dict) -> str:
    """The lines `gptkit info --world-size N` prints for per_device_memory's figures."""
    lines = [f"  training memory per device, {mem['world_size']} process(es) (fp32 weights + grads + AdamW; "
             "activations not included):"]
    for name in ("ddp", "fsdp"):
        m = mem[name]
        lines.append(f"    {name:<5} {_gib(m['total']):>11}  = weights {_gib(m['weights'])} + grads {_gib(m['grads'])} "
                     f"+ AdamW {_gib(m['adamw'])}" + (f" + gathered for compute {_gib(m['gathered'])}"
                                                       if m["gathered"] else ""))
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
