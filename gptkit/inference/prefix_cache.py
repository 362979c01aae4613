"""Prefix caching: the keys and values of prompt prefixes, kept for later requests.

Chat clients resend the same system prompt and the whole conversation on every turn, and
agents the same tool list: without this, every request prefills all of it again. The cache
keeps the KV entries of token blocks (`block_tokens` ids each, every layer) in a dict bounded
in bytes, evicting the least recently used block first.

- A block's key is a hash of every token id from the start of the sequence to the end of the
  block (a chain: hash(parent's key, the block's ids)), so a block is reused only after exactly
  the same tokens, at the same positions. The block's own ids are kept and compared too.
- Only whole blocks are kept. A prompt reuses its longest run of cached blocks from the start
  and prefills the rest, and always prefills at least its last token: its logits start the sample.
- What a request prefilled is stored after its prefill, and what it generated when its row ends
  (the next turn of a chat resends the reply).
- One cache per engine, and an engine's weights never change (LoRA merged, quantization and
  dtype fixed when it is built): entries are never reused across weights. A server serving
  `model` and `model@int8` has two engines, so two caches.
- Looked up and filled only by the scheduler step (one thread); `stats` may be read anywhere.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from gptkit.model.gpt import KVCache

BLOCK_TOKENS = 16


@dataclass
class PrefixStats:
    """Counts since the engine started (for /metrics)."""
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one block
    prompt_tokens: int = 0  # tokens of the prompts looked up
    hit_tokens: int = 0  # of those, tokens not prefilled again
    evictions: int = 0  # blocks dropped to stay within capacity
    bytes: int = 0  # held now
    blocks: int = 0  # held now


@dataclass
class _Block:
    ids: tuple[int, ...]
    k: torch.Tensor  # (n_layer, n_kv_head, block_tokens, head_dim)
    v: torch.Tensor


class PrefixCache:
    def __init__(self, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if capacity_bytes < 0 or block_tokens < 1:
            raise ValueError(f"prefix cache of {capacity_bytes} bytes in blocks of {block_tokens} tokens")
        self.capacity_bytes, self.block_tokens = capacity_bytes, block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self.stats = PrefixStats()

    def restore(self, cache: KVCache, row: int, prompt: list[int]) -> int:
        """Copy the cached blocks that start `prompt` into cache row `row` (its length becomes
        their token count) and return that count: the tokens left to prefill are prompt[count:]."""
        B = self.block_tokens
        found = []
        for key, ids in self._chain(prompt, (len(prompt) - 1) // B):
            block = self._blocks.get(key)
            if block is None or block.ids != ids:
                break
            found.append((key, block))
        for i, (_, block) in enumerate(found):
            cache.k[:, row, :, i * B:(i + 1) * B] = block.k
            cache.v[:, row, :, i * B:(i + 1) * B] = block.v
        self._touch([key for key, _ in found])
        n = len(found) * B
        cache.lengths[row] = n
        s = self.stats
        s.lookups, s.hits = s.lookups + 1, s.hits + (n > 0)
        s.prompt_tokens, s.hit_tokens = s.prompt_tokens + len(prompt), s.hit_tokens + n
        return n

    def store(self, cache: KVCache, row: int, tokens: list[int]) -> None:
        """Keep the whole blocks of `tokens`, whose keys and values cache row `row` holds."""
        B = self.block_tokens
        n_blocks = min(len(tokens), cache.lengths[row]) // B
        chain = self._chain(tokens, n_blocks)
        for i, (key, ids) in enumerate(chain):
            if key not in self._blocks:
                k = cache.k[:, row, :, i * B:(i + 1) * B].clone()
                self._blocks[key] = _Block(ids, k, cache.v[:, row, :, i * B:(i + 1) * B].clone())
                self.stats.bytes += 2 * k.numel() * k.element_size()
        self._touch([key for key, _ in chain])
        while self.stats.bytes > self.capacity_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.stats.bytes -= 2 * block.k.numel() * block.k.element_size()
            self.stats.evictions += 1
        self.stats.blocks = len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self.stats.bytes = self.stats.blocks = 0

    def _touch(self, keys: list[bytes]) -> None:
        """Most recently used, the first block last: a prefix outlives its continuations, so
        eviction never leaves blocks that no lookup can reach before their parents go."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _chain(self, tokens: list[int], n_blocks: int) -> list[tuple[bytes, tuple[int, ...]]]:
        """(key, ids) of the first n_blocks whole blocks of `tokens`."""
        B, key, out = self.block_tokens, b"", []
        for i in range(n_blocks):
            ids = tuple(tokens[i * B:(i + 1) * B])
            key = hashlib.blake2b(key + array("q", ids).tobytes(), digest_size=16).digest()
            out.append((key, ids))
        return out
