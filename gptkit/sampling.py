"""Sampling one token per row from a batch of logits, each row with its own parameters.

The engine calls `sample(logits, rows)` once per step. Each row is sampled on its own, so an
error in one row (a NaN distribution, a parameter the maths cannot handle) is returned for
that row alone and the engine fails only its request. Parameters at the edge of float32 never
raise: a temperature below GREEDY_BELOW samples greedily (dividing logits by it overflows),
and top_p always keeps the most likely token (a top_p that rounds to 0 in float32 would
otherwise drop every token).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from gptkit.config import SampleConfig

GREEDY_BELOW = 1e-5  # temperatures below this are treated as 0 (greedy)


class SampledRow(Protocol):
    """What sampling needs of a running sample (the engine's _Row)."""

    params: SampleConfig
    generator: torch.Generator
    counts: torch.Tensor | None


def sample(logits: torch.Tensor, rows: list[SampledRow]) -> tuple[torch.Tensor, dict[int, Exception]]:
    """One token per row (B,) from float logits (B, V), and the errors of rows that failed
    (row index -> exception; their token is meaningless)."""
    tokens = logits.argmax(dim=-1)
    errors: dict[int, Exception] = {}
    for i, r in enumerate(rows):
        p = r.params
        penalised = bool(p.presence_penalty or p.frequency_penalty)
        if not penalised and p.temperature < GREEDY_BELOW:
            continue  # the batched argmax above
        try:
            row_logits = logits[i] - _penalty(r, logits.shape[-1], logits.device) if penalised else logits[i]
            if p.temperature < GREEDY_BELOW:
                tokens[i] = row_logits.argmax()
            else:
                tokens[i] = _sample_row(row_logits, p, r.generator)
        except Exception as e:  # this row's request fails; the others go on
            errors[i] = e
    return tokens, errors


def _penalty(row: SampledRow, vocab: int, device: torch.device) -> torch.Tensor:
    if row.counts is None:
        row.counts = torch.zeros(vocab, device=device)
    p = row.params
    return row.counts * p.frequency_penalty + (row.counts > 0).float() * p.presence_penalty


def _sample_row(logits: torch.Tensor, p: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    # shift so the best logit is 0 first: dividing by a small temperature then gives -inf for
    # unlikely tokens (probability 0), never inf - inf = NaN
    logits = (logits - logits.max()) / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest set whose mass reaches top_p: drop tokens whose preceding mass already does
        drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
        drop[0] = False  # the most likely token always stays, however small top_p is
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[0]


def top_dicts(logp: torch.Tensor, k: int) -> list[dict[int, float]]:
    """The k most likely ids of each row of log-probabilities (B, V), as {id: logprob}."""
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
