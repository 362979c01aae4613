"""The GPT model: a decoder-only Transformer, read top to bottom.

Token embedding + positions -> N pre-norm blocks (causal self-attention, MLP) -> final norm
-> LM head (tied to the token embedding by default). Parameter names follow GPT-2 (wte, wpe,
c_attn, c_proj, c_fc, ln_1, ln_2, ln_f, lm_head) so that conversion to and from Hugging Face
checkpoints is a key map.

The defaults are GPT-2. The later decoders (Llama, Qwen, Mistral) are options of the same
blocks (gptkit.config.ModelConfig): rotary positions, RMSNorm, a SwiGLU MLP, fewer key/value
heads than query heads (grouped-query attention: the KV cache holds only the KV heads),
RMSNorm on queries and keys, biases on QKV alone, an untied head.

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

    k, v: (n_layer, B, n_kv_head, max_len, head_dim). Row b holds `lengths[b]` tokens.
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
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
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


def norm_layer(config: ModelConfig, width: int | None = None) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (Llama: no mean subtracted, no bias)."""
    width = width or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.layer_norm_eps)
    return nn.LayerNorm(width, eps=config.layer_norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_dim) of rotary positions. Channel i and channel i + hs/2 of
    a head form a pair that turns by position * theta^(-2i/hs): Llama's layout (rotate_half)."""
    hs = config.head_dim
    theta, positions = config.rope_theta, torch.arange(config.block_size, dtype=torch.float64)
    if config.rope_scaling == "linear":  # position p turns as p / factor did: the trained angles, closer together
        positions = positions / config.rope_factor
    elif config.rope_scaling == "ntk":  # a larger base: the slowest pair turns factor times slower, the fastest alike
        theta = theta * config.rope_factor ** (hs / (hs - 2))
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    scale = 1.0
    if config.rope_scaling == "yarn":
        inv_freq, scale = yarn(config, inv_freq)
    angles = positions[:, None] * inv_freq  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs): both channels of a pair turn alike
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def yarn(config: ModelConfig, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023), computed as transformers does: a pair that turns more than 32 times
    over the trained context keeps its speed (it never saw a longer one as different), a pair that
    turns less than once is slowed by the factor (linear interpolation), a linear ramp between; and
    attention is sharpened back with cos and sin scaled by 0.1 ln(factor) + 1."""
    hs, factor = config.head_dim, config.rope_factor
    trained = config.rope_original_context or round(config.block_size / factor)

    def pair(turns: float) -> float:  # the (fractional) pair index that turns `turns` times over `trained`
        return hs * math.log(trained / (turns * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = max(math.floor(pair(32)), 0), min(math.ceil(pair(1)), hs - 1)
    ramp = ((torch.arange(hs // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+hs/2}) pair of x (B, T, heads, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast x may be bf16
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(Q K^T / sqrt(d_k)) V, one fused QKV matmul.

    With n_kv_head < n_head (grouped-query attention) each key/value head serves
    n_head / n_kv_head query heads; keys, values and the KV cache hold only the KV heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def _qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q, k, v = q.view(B, T, nh, hs), k.view(B, T, nkv, hs), v.view(B, T, nkv, hs)
        # norms and rotations per head before the heads move to dim 1, where they read memory in
        # order (~3 % of a small Qwen3-shaped model's CPU training step, BENCHMARKS.md)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope)
        mask = "causal"
        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer, k, v)  # (B, nkv, L, hs), L = cached + T
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=mask == "causal", enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # heads side by side
        return self.resid_dropout(self.c_proj(y))

    def inspect(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """forward in eval mode without a cache, with the attention written out (the fused SDPA
        kernel never materialises it): the output and the softmax weights (B, nh, T, T), row i
        over keys 0..i. No dropout: this path is for looking, not training."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope)
        group = self.n_head // self.n_kv_head  # query heads per KV head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.c_proj(y), weights


class MLP(nn.Module):
    """Two matmuls around an activation; SwiGLU's first one computes the gate and the value
    side by side (c_fc's output is [gate | up]) and multiplies them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_dim
        self.activation = config.activation
        self.c_fc = nn.Linear(config.n_embd, (2 if self.activation == "swiglu" else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:  # GPT-2 uses the tanh approximation; imported GPT-2 models keep it for exact parity
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x)).

    With `checkpoint` set (the trainer's --activation-checkpointing), training keeps only the
    block's input and recomputes the rest in the backward pass: less memory, ~1/3 more compute.
    The recomputation runs inside forward, so FSDP's hooks on the block see one forward call."""

    checkpoint: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.checkpoint and self.training and kv_cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, None, layer, rope, use_reentrant=False)
        return self._forward(x, kv_cache, layer, rope)

    def _forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope)
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
        elif config.pos_encoding == "sinusoidal":  # fixed, so a buffer that checkpoints need not store
            self.register_buffer("pe", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        else:  # rotary: nothing is added to the embedding; the blocks turn queries and keys
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = norm_layer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation.

        - every Linear weight and both embeddings: N(0, 0.02); biases: 0
        - residual projections (attn.c_proj, mlp.c_proj): N(0, 0.02 / sqrt(2 * n_layer)),
          since each block adds two of them to the residual stream
        - LayerNorm, RMSNorm: weight 1, bias 0
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
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
        rope = self._rope(positions)
        for layer, block in enumerate(self.h):
            x = block(x, kv_cache, layer, rope)
        if kv_cache is not None:
            kv_cache.end(T)
        return self.ln_f(x)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        if hasattr(self, "wpe"):
            x = x + self.wpe(positions)
        elif hasattr(self, "pe"):
            x = x + self.pe[positions]
        return self.drop(x)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary cos and sin for positions (T,) or (B, T), shaped to broadcast over (B, T, heads, hs)."""
        if not hasattr(self, "rope_cos"):
            return None
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, hs) or (B, T, hs)
        return cos[..., None, :], sin[..., None, :]  # (T, 1, hs) or (B, T, 1, hs): over (B, T, heads, hs)

    def attention_maps(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) and the attention weights of every layer and head
        (n_layer, B, nh, T, T), from an inspection pass that computes softmax(QK^T/sqrt(d))
        explicitly; the same blocks as forward, so the logits match it."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        positions = torch.arange(T, device=idx.device)
        x, rope = self._embed(idx, positions), self._rope(positions)
        maps = []
        for block in self.h:
            y, weights = block.attn.inspect(block.ln_1(x), rope)
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
