"""The GPT model: a decoder-only Transformer, read top to bottom.

Token embedding + positions -> N pre-LayerNorm blocks (causal self-attention, GELU MLP)
-> final LayerNorm -> LM head tied to the token embedding. Parameter names follow
GPT-2 (wte, wpe, c_attn, c_proj, c_fc, ln_1, ln_2, ln_f, lm_head) so that conversion
to and from Hugging Face checkpoints is a key map.

This file is math only: no I/O, logging or data code.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from gptkit.config import ModelConfig


class KVCache:
    """Preallocated keys and values for every layer, with a cached length per row.

    k, v: (n_layer, B, n_head, max_len, head_dim). Row b holds `lengths[b]` tokens.
    A forward pass of T new tokens writes them at positions lengths[b] .. lengths[b]+T-1
    of each row; nothing is allocated per step. `rows(a, b)` is a view on a slice of
    rows, so an engine can prefill one slot while the others keep their state.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int]):
        self.k, self.v, self.lengths = k, v, lengths
        self._step: tuple | None = None  # (positions, mask, key_len) for the forward in flight

    @classmethod
    def allocate(cls, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device)
        return cls(k, torch.zeros_like(k), [0] * batch_size)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view on rows [start, stop): writes through it land in this cache."""
        view = KVCache(self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop])
        view._parent, view._offset = self, start
        return view

    def begin(self, T: int, device: torch.device) -> torch.Tensor:
        """Prepare a forward of T new tokens per row; returns their positions (B, T)."""
        start = torch.tensor(self.lengths, device=device)
        positions = start[:, None] + torch.arange(T, device=device)  # (B, T)
        key_len = max(self.lengths) + T
        if key_len > self.max_len:
            raise ValueError(f"KV cache overflow: {key_len} tokens > max_len {self.max_len}")
        if min(self.lengths) == max(self.lengths):
            # All rows aligned: causal inside the new block, everything before is visible.
            mask = None if T == 1 else "causal" if self.lengths[0] == 0 else self._mask(positions, key_len, device)
        else:
            mask = self._mask(positions, key_len, device)
        self._step = (positions, mask, key_len)
        return positions

    @staticmethod
    def _mask(positions: torch.Tensor, key_len: int, device: torch.device) -> torch.Tensor:
        keys = torch.arange(key_len, device=device)
        return (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, key_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this layer's new k, v (B, nh, T, hs); return all keys, values and the mask."""
        positions, mask, key_len = self._step
        T = k.shape[2]
        if min(self.lengths) == max(self.lengths):
            p = self.lengths[0]
            self.k[layer, :, :, p:p + T] = k
            self.v[layer, :, :, p:p + T] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            self.k[layer][rows, :, positions] = k.transpose(1, 2)  # index (B,T) -> (B, T, nh, hs)
            self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.k[layer, :, :, :key_len], self.v[layer, :, :, :key_len], mask

    def end(self, T: int) -> None:
        self.lengths[:] = [n + T for n in self.lengths]
        parent = getattr(self, "_parent", None)
        if parent is not None:  # keep the parent's bookkeeping in step with the view
            parent.lengths[self._offset:self._offset + len(self.lengths)] = self.lengths
        self._step = None

    def reset(self) -> None:
        self.lengths[:] = [0] * len(self.lengths)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(Q K^T / sqrt(d_k)) V, one fused QKV matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        mask = "causal"
        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer, k, v)  # (B, nh, L, hs), L = cached + T
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=mask == "causal")
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def inspect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward in eval mode without a cache, with the attention written out (the fused SDPA
        kernel never materialises it): the output and the softmax weights (B, nh, T, T), row i
        over keys 0..i. No dropout: this path is for looking, not training."""
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y), weights


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # GPT-2 uses the tanh approximation; imported GPT-2 models keep it for exact parity.
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x)).

    With `checkpoint` set (the trainer's --activation-checkpointing), training keeps only the
    block's input and recomputes the rest in the backward pass: less memory, ~1/3 more compute.
    The recomputation runs inside forward, so FSDP's hooks on the block see one forward call."""

    checkpoint: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if self.checkpoint and self.training and kv_cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x, kv_cache, layer)

    def _forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def sinusoidal_positions(n_pos: int, d: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); (n_pos, d)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(10000.0, -torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.zeros(n_pos, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)[:, : d // 2]
    return pe.float()


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # fixed, so a buffer that checkpoints need not store
            self.register_buffer("pe", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation.

        - every Linear weight and both embeddings: N(0, 0.02); biases: 0
        - residual projections (attn.c_proj, mlp.c_proj): N(0, 0.02 / sqrt(2 * n_layer)),
          since each block adds two of them to the residual stream
        - LayerNorm: weight 1, bias 0
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) for token ids idx (B, T)."""
        B, T = idx.shape
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
            positions = torch.arange(T, device=idx.device)  # (T,)
        else:
            positions = kv_cache.begin(T, idx.device)  # (B, T)
        x = self._embed(idx, positions)
        for layer, block in enumerate(self.h):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.end(T)
        return self.ln_f(x)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        pos_emb = self.wpe(positions) if hasattr(self, "wpe") else self.pe[positions]
        return self.drop(self.wte(idx) + pos_emb)

    def attention_maps(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) and the attention weights of every layer and head
        (n_layer, B, nh, T, T), from an inspection pass that computes softmax(QK^T/sqrt(d))
        explicitly; the same blocks as forward, so the logits match it."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        x = self._embed(idx, torch.arange(T, device=idx.device))
        maps = []
        for block in self.h:
            y, weights = block.attn.inspect(block.ln_1(x))
            x = x + y
            x = x + block.mlp(block.ln_2(x))
            maps.append(weights)
        return self.lm_head(self.ln_f(x)), torch.stack(maps)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False, head: str | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) — or (B, 1, vocab) with last_only — or, given targets, the mean
        cross-entropy loss over targets that are not -100. With head, the logits (B, out) of
        self.heads[head] on the hidden state at each row's position last (B,) (classification;
        computed here so DDP and FSDP see it as the model's forward)."""
        x = self.hidden(idx, kv_cache)
        if head is not None:
            return self.heads[head](x[torch.arange(x.shape[0], device=x.device), last])
        if targets is not None:
            logits = self.lm_head(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        if last_only:  # generation needs only the last position: skip the big head matmul for the rest
            x = x[:, -1:, :]
        return self.lm_head(x)
