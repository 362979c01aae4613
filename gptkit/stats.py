"""Sizes and costs of a model shape, computed on the meta device (nothing is allocated)."""

from __future__ import annotations

import torch

from gptkit.config import ModelConfig


def model_stats(cfg: ModelConfig) -> dict:
    from gptkit.model import GPT

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
    }
