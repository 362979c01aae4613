"""Batched sampling (gptkit/sampling.py) against its per-row definition: greedy where it must
be, draws distributed as softmax(filtered logits / temperature), filtered tokens never drawn,
seeds reproducible per row whatever else is in the batch, a non-finite row reported alone."""

from __future__ import annotations

import pytest
import torch

from gptkit.config import SampleConfig
from gptkit.inference.sampling import RowParams, sample_batch, uniform_noise

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # distinct: no ties at any cut


def params_for(configs: list[SampleConfig], seeds: list[int], vocab: int = V, steps: list[int] | None = None) -> RowParams:
    p = RowParams.allocate(len(configs), vocab)
    for i, (c, s) in enumerate(zip(configs, seeds)):
        p.set(i, c, s)
    if steps is not None:
        p.step[:] = torch.tensor(steps)
    return p


def draws(config: SampleConfig, n: int = 4000, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """n tokens from the same logits: n rows with seeds 0..n-1 (one call, no Python loop)."""
    tokens, bad = sample_batch(logits.expand(n, -1), params_for([config] * n, list(range(n)), logits.shape[-1]))
    assert not bad.any()
    return tokens


def reference_probs(logits: torch.Tensor, config: SampleConfig) -> torch.Tensor:
    """The per-row definition, written out: temperature, then top-k, then top-p over the sorted
    probabilities keeping the smallest prefix whose mass reaches top_p."""
    scaled = logits / config.temperature
    if config.top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(config.top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1)
    if config.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < config.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize("config", [SampleConfig(temperature=1.0), SampleConfig(temperature=0.5),
                                    SampleConfig(temperature=1.3, top_k=3), SampleConfig(top_p=0.7),
                                    SampleConfig(temperature=2.0, top_k=5, top_p=0.8)],
                         ids=["t1", "t0.5", "topk3", "topp0.7", "t2-topk5-topp0.8"])
def test_draws_follow_the_per_row_distribution(config):
    tokens = draws(config)
    freq = torch.bincount(tokens, minlength=V).float() / len(tokens)
    expected = reference_probs(LOGITS, config)
    assert (freq - expected).abs().max() < 0.03, (freq, expected)  # ~4 standard errors at n=4000
    assert (freq[expected == 0] == 0).all()  # no filtered token is drawn
    assert (freq[expected > 0.002] > 0).all()  # every token likely enough to come up in n draws does


def test_filtered_tokens_are_never_drawn_in_a_large_vocabulary():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    for config in (SampleConfig(top_k=10, temperature=3.0), SampleConfig(top_p=0.5, temperature=2.0)):
        allowed = reference_probs(logits, config) > 0
        tokens = draws(config, n=3000, logits=logits)
        assert allowed[tokens].all()
        assert len(set(tokens.tolist())) > 5  # it does sample, not only the top token


def test_greedy_top_k_1_and_tiny_top_p_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    configs = [SampleConfig(temperature=0), SampleConfig(temperature=1.0), SampleConfig(top_k=1),
               SampleConfig(temperature=1.0), SampleConfig(top_p=1e-6), SampleConfig(top_p=1e-46)]  # 0 in float32
    tokens, bad = sample_batch(logits, params_for(configs, list(range(6)), vocab=50))
    argmax = logits.argmax(-1)
    assert not bad.any()
    assert tokens[[0, 2, 4, 5]].tolist() == argmax[[0, 2, 4, 5]].tolist()


def test_penalties_follow_openai():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0], [3.0, 2.5, 0.0, 0.0]])
    p = params_for([SampleConfig(temperature=0, presence_penalty=1.0), SampleConfig(temperature=0, frequency_penalty=0.3)],
                   [0, 1], vocab=4)
    p.counts[:, 0] = 2  # token 0 was generated twice: 3 - 1 < 2.5 (presence), 3 - 0.6 < 2.5 (frequency)
    assert sample_batch(logits, p)[0].tolist() == [1, 1]
    p.counts[1, 0] = 1  # once: 3 - 0.3 > 2.5
    assert sample_batch(logits, p)[0].tolist() == [1, 0]


def test_a_seeded_row_draws_the_same_whatever_else_is_in_the_batch():
    vocab = 300
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2))
    mine = SampleConfig(temperature=1.5, top_p=0.95, seed=7)
    others = [SampleConfig(temperature=0.7, top_k=20), SampleConfig(temperature=0), SampleConfig(top_p=0.5)]
    alone, beside = [], []
    for step in range(30):
        p = params_for([mine], [7], vocab, steps=[step])
        alone.append(sample_batch(logits[None], p)[0].item())
        p = params_for(others + [mine], [1, 2, 3, 7], vocab, steps=[0, 5, step + 3, step])
        beside.append(sample_batch(logits.expand(4, -1), p)[0][3].item())
    assert alone == beside
    assert len(set(alone)) > 5  # the steps draw different tokens
    other_seed = [sample_batch(logits[None], params_for([mine], [8], vocab, steps=[s]))[0].item() for s in range(30)]
    assert other_seed != alone


def test_a_non_finite_row_is_reported_alone():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    configs = [SampleConfig(temperature=1.0, top_p=0.9), SampleConfig(temperature=1.0), SampleConfig(temperature=0)]
    clean, bad = sample_batch(logits, params_for(configs, [1, 2, 3], vocab=40))
    assert not bad.any()
    for poison in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[1, 5] = poison
        tokens, bad = sample_batch(broken, params_for(configs, [1, 2, 3], vocab=40))
        assert bad.tolist() == [False, True, False]
        assert tokens[[0, 2]].tolist() == clean[[0, 2]].tolist()


def test_noise_is_uniform_and_uncorrelated_across_ids_and_steps():
    u = uniform_noise(torch.zeros(2000, dtype=torch.long), torch.arange(2000), 64)  # (steps, ids), one seed
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(torch.corrcoef(u.T[:8]).fill_diagonal_(0)).max() < 0.1  # ids against ids, over steps
    high = uniform_noise(torch.tensor([5, 5 + 2**32, 5 - 2**62]), torch.zeros(3, dtype=torch.long), 64)
    assert not torch.equal(high[0], high[1]) and not torch.equal(high[0], high[2])  # every bit of the seed counts
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert (counts / u.numel() - 1 / 16).abs().max() < 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the noise is the same on the GPU")
def test_noise_and_draws_are_the_same_on_cuda():
    seed, step = torch.arange(16) * 12345, torch.arange(16)
    assert torch.equal(uniform_noise(seed, step, 5000), uniform_noise(seed.cuda(), step.cuda(), 5000).cpu())
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(4))
    configs = [SampleConfig(temperature=1.0, top_k=50 * (i % 3), top_p=1 - 0.1 * (i % 4)) for i in range(16)]
    cpu = sample_batch(logits, params_for(configs, list(range(16)), 5000))[0]
    p = params_for(configs, list(range(16)), 5000)
    gpu = sample_batch(logits.cuda(), RowParams(*(t.cuda() for t in p._tensors()), p.uses))[0].cpu()
    assert (cpu == gpu).float().mean() > 0.9  # the same up to float rounding of near-ties
