"""Prefix caching: the same tokens out with and without the cache (greedy), reuse only of exactly
the same prefix, bounded bytes with LRU eviction, replies kept for the next turn, rows joining
mid-run, and the server's metrics."""

from __future__ import annotations

import copy

import pytest
import torch

from gptkit.config import ModelConfig, SampleConfig
from gptkit.inference.engine import Engine
from gptkit.inference.prefix_cache import PrefixCache
from gptkit.model.gpt import GPT, KVCache

VOCAB = 101
CONFIGS = {
    "gpt2": ModelConfig(vocab_size=VOCAB, block_size=256, n_layer=2, n_head=4, n_embd=48),
    "llama": ModelConfig(vocab_size=VOCAB, block_size=256, n_layer=2, n_head=6, n_kv_head=2, n_embd=60, head_size=14,
                         pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False),
}


def make_model(config: ModelConfig) -> GPT:
    torch.manual_seed(0)
    m = GPT(config).eval()
    with torch.no_grad():  # peaked logits: greedy has no near-ties that rounding could flip
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = SampleConfig(max_tokens=12, temperature=0.0)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_greedy_output_is_the_same_with_and_without_the_cache(arch):
    model = make_model(CONFIGS[arch])
    plain = Engine(copy.deepcopy(model), max_batch=2)
    cached = Engine(copy.deepcopy(model), max_batch=2, prefix_cache_bytes=2**24)
    system = tokens(53, 1)  # 3 whole blocks of 16 and 5 tokens: the shared prefix ends mid-block
    prompts = [system + tokens(9, 2), system + tokens(30, 3), system, system[:40], system + tokens(9, 2)]
    for prompt in prompts:
        assert cached.generate(prompt, GREEDY)[0].token_ids == plain.generate(prompt, GREEDY)[0].token_ids
    stats = cached.prefix_cache.stats
    assert stats.lookups == len(prompts)
    # 2nd and 3rd: the 3 whole blocks of the system prompt; 4th: 2 blocks (40 tokens, the last
    # prefilled); 5th: the first prompt again, plus the block its reply completed
    assert stats.hit_tokens == 48 + 48 + 32 + 48
    assert stats.hits == 4


def test_a_changed_token_reuses_only_the_blocks_before_it():
    cached = Engine(make_model(CONFIGS["gpt2"]), max_batch=1, prefix_cache_bytes=2**24)
    first = tokens(80, 4)
    cached.generate(first, SampleConfig(max_tokens=1))
    changed = list(first)
    changed[37] = (changed[37] + 1) % VOCAB  # in the third block
    cache = KVCache.allocate(cached.config, 1)
    assert cached.prefix_cache.restore(cache, 0, changed) == 32
    assert cached.prefix_cache.restore(cache, 0, first) == 64  # 79 at most, in whole blocks
    assert cached.prefix_cache.restore(cache, 0, tokens(80, 5)) == 0


def test_a_reply_is_kept_for_the_next_turn():
    cached = Engine(make_model(CONFIGS["gpt2"]), max_batch=1, prefix_cache_bytes=2**24)
    prompt = tokens(20, 6)
    reply = cached.generate(prompt, SampleConfig(max_tokens=40, temperature=0.0))[0].token_ids
    before = cached.prefix_cache.stats.hit_tokens
    cached.generate(prompt + reply + tokens(5, 7), GREEDY)
    # the prompt and its reply were in the row: everything in whole blocks but the last token fed
    fed = len(prompt) + len(reply) - 1
    assert cached.prefix_cache.stats.hit_tokens - before == fed // 16 * 16


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-decode"])
def test_rows_that_join_mid_run_get_the_same_tokens(static):
    model = make_model(CONFIGS["llama"])
    plain = Engine(copy.deepcopy(model), max_batch=4)
    cached = Engine(copy.deepcopy(model), max_batch=4, prefix_cache_bytes=2**24, static_decode=static)
    system = tokens(37, 8)
    long = SampleConfig(max_tokens=30, temperature=0.0)
    prompts = [system + tokens(k, 10 + k) for k in (3, 17, 1)]
    want = [plain.generate(p, GREEDY if i else long)[0].token_ids for i, p in enumerate(prompts)]
    first = cached.submit(prompts[0], long)
    for _ in range(5):
        cached.step()  # the first runs alone for a while, then two rows join with cached prefixes
    later = [cached.submit(p, GREEDY) for p in prompts[1:]]
    got = [h.result()[0].token_ids for h in [first] + later]
    assert got == want
    assert cached.prefix_cache.stats.hit_tokens == 2 * 32


def test_the_cache_stays_within_its_bytes_and_evicts_the_least_recently_used():
    config = CONFIGS["gpt2"]
    block_bytes = 2 * config.n_layer * config.kv_heads * 16 * config.head_dim * 4
    pc = PrefixCache(capacity_bytes=5 * block_bytes)
    cache = KVCache.allocate(config, 1)
    a, b = tokens(64, 11), tokens(64, 12)
    cache.lengths[0] = 64
    pc.store(cache, 0, a)  # 4 blocks
    pc.store(cache, 0, b)  # 4 more: 3 evicted, a's continuations first, its first block last
    assert pc.stats.bytes == 5 * block_bytes and pc.stats.blocks == 5 and pc.stats.evictions == 3
    assert pc.restore(cache, 0, a + [1]) == 16  # a's first block outlived its continuations
    assert pc.restore(cache, 0, b + [1]) == 64
    assert PrefixCache(capacity_bytes=block_bytes - 1).restore(cache, 0, a) == 0


def test_restored_keys_and_values_are_the_ones_stored():
    config = CONFIGS["llama"]
    pc, src, dst = PrefixCache(2**24), KVCache.allocate(config, 2), KVCache.allocate(config, 2)
    src.k.normal_(), src.v.normal_()
    src.lengths[1] = 48
    prompt = tokens(50, 13)
    pc.store(src, 1, prompt)
    assert pc.restore(dst, 0, prompt) == 48 and dst.lengths == [48, 0]
    assert torch.equal(dst.k[:, 0, :, :48], src.k[:, 1, :, :48])
    assert torch.equal(dst.v[:, 0, :, :48], src.v[:, 1, :, :48])
