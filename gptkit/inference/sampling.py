"""Sampling one token per row from a batch of logits, each row with its own parameters, as
tensor ops: no per-row Python loop and no host sync, so a GPU step runs without stalls.

`RowParams` holds every cache row's parameters as device tensors (written when a row is
admitted, moved when rows are compacted); `sample_batch(logits, params)` is the pure function
the engine calls once per step. Its guarantees:

- temperature below GREEDY_BELOW samples greedily (dividing logits by it overflows);
- top_k keeps the k most likely tokens (and any tied with the k-th), top_p the smallest set
  whose mass reaches top_p, always at least the most likely token (a top_p that rounds to 0 in
  float32 would otherwise drop every token); a filtered token is never drawn;
- penalties follow OpenAI: logit -= frequency * count + presence * (count > 0);
- a row whose penalised logits are not finite (a NaN, an inf) is reported in `bad` and the
  engine fails that row's request alone; the other rows' tokens are unaffected.

Randomness without a torch.Generator per row: the noise of token v in row r at step s is a
counter-based hash of (seed_r, s, v), turned into Gumbel noise; the token is the argmax of the
filtered, tempered logits plus that noise (the Gumbel-max trick: an exact draw from the
softmax). So a seeded row gives the same tokens whatever else is in the batch, and the same on
CPU and GPU up to float rounding of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptkit.config import SampleConfig

GREEDY_BELOW = 1e-5  # temperatures below this are treated as 0 (greedy)
_M32 = 0xFFFFFFFF


class SamplingError(RuntimeError):
    """A row's next-token distribution is not finite: its request fails alone."""


@dataclass
class Uses:
    """What the rows of one call use, known on the host from their parameters: filters no row
    needs are skipped (the full-vocabulary sort costs more than a CPU decode step's sampling)."""

    top_k: bool = False
    top_p: bool = False
    penalties: bool = False
    sampling: bool = False  # some row is not greedy

    @classmethod
    def of(cls, params: SampleConfig) -> "Uses":
        return cls(top_k=bool(params.top_k), top_p=params.top_p < 1.0,
                   penalties=bool(params.presence_penalty or params.frequency_penalty),
                   sampling=params.temperature >= GREEDY_BELOW)

    @classmethod
    def any(cls, rows: list["Uses"]) -> "Uses":
        return cls(*(any(getattr(u, f) for u in rows) for f in ("top_k", "top_p", "penalties", "sampling")))


@dataclass
class RowParams:
    """Sampling parameters of every cache row as tensors (R,), plus generated-token counts
    (R, V) for penalties and each row's step counter (tokens sampled so far)."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # 0 = off
    top_p: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    seed: torch.Tensor  # int64
    step: torch.Tensor  # int64
    counts: torch.Tensor  # (R, V) float32
    uses: list[Uses]  # host side, per row

    @classmethod
    def allocate(cls, rows: int, vocab: int, device: torch.device | str = "cpu") -> "RowParams":
        def zeros(dtype=torch.float32):
            return torch.zeros(rows, dtype=dtype, device=device)
        return cls(zeros(), zeros(torch.int64), torch.ones(rows, device=device), zeros(), zeros(),
                   zeros(torch.int64), zeros(torch.int64), torch.zeros(rows, vocab, device=device),
                   [Uses() for _ in range(rows)])

    def rows(self, start: int, stop: int) -> "RowParams":
        """A view on rows [start, stop): what one sample_batch call reads."""
        return RowParams(*(t[start:stop] for t in self._tensors()), self.uses[start:stop])

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.temperature, self.top_k, self.top_p, self.presence, self.frequency, self.seed, self.step,
                self.counts)

    def set(self, row: int, params: SampleConfig, seed: int) -> None:
        """Admit a row: its parameters, a seed (wrapped into int64), step 0, no counts."""
        vocab = self.counts.shape[1]
        values = (params.temperature, min(params.top_k, vocab), params.top_p, params.presence_penalty,
                  params.frequency_penalty, (seed + 2**63) % 2**64 - 2**63, 0)
        for t, v in zip(self._tensors()[:-1], values, strict=True):
            t[row] = v
        self.counts[row] = 0
        self.uses[row] = Uses.of(params)

    def copy_row(self, src: int, dst: int) -> None:
        for t in self._tensors():
            t[dst] = t[src]
        self.uses[dst] = self.uses[src]

    def advance(self, tokens: torch.Tensor) -> None:
        """After a step: count each row's token (for penalties) and move its step counter on."""
        if any(u.penalties for u in self.uses):
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))
        self.step += 1


def sample_batch(logits: torch.Tensor, p: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row (B,) from float logits (B, V), and a bool (B,) that is True for rows
    whose distribution is not finite (their token is meaningless)."""
    uses = Uses.any(p.uses)
    if uses.penalties:
        logits = logits - p.counts * p.frequency[:, None] - (p.counts > 0).float() * p.presence[:, None]
    best, greedy_tokens = logits.max(dim=-1)
    bad = ~torch.isfinite(best)  # NaN propagates through max; +-inf everywhere is no distribution either
    if not uses.sampling:
        return greedy_tokens, bad
    greedy = p.temperature < GREEDY_BELOW
    temperature = torch.where(greedy, torch.ones_like(p.temperature), p.temperature)
    # shift so the best logit is 0 first: dividing by a small temperature then gives -inf for
    # unlikely tokens (probability 0), never inf - inf = NaN
    scaled = (logits - best[:, None]) / temperature[:, None]
    noise = gumbel_noise(p.seed, p.step, logits.shape[-1])
    if uses.top_k or uses.top_p:
        sampled = _sample_filtered(scaled, noise, p, uses)
    else:
        sampled = (scaled + noise).argmax(dim=-1)
    return torch.where(greedy, greedy_tokens, sampled), bad


def _sample_filtered(scaled: torch.Tensor, noise: torch.Tensor, p: RowParams, uses: Uses) -> torch.Tensor:
    """Gumbel-max over the top-k / top-p filtered logits, in sorted order (one sort per row)."""
    V = scaled.shape[-1]
    values, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    drop = torch.zeros_like(values, dtype=torch.bool)
    if uses.top_k:
        k = p.top_k.clamp(1, V)
        kth = values.gather(1, (k - 1)[:, None])  # (B, 1)
        drop |= ((p.top_k > 0) & (p.top_k < V))[:, None] & (values < kth)  # ties with the k-th stay
        values = values.masked_fill(drop, float("-inf"))
    if uses.top_p:
        probs = values.softmax(dim=-1)
        # keep the smallest set whose mass reaches top_p: drop tokens whose preceding mass already does
        beyond = (probs.cumsum(dim=-1) - probs) >= p.top_p[:, None]
        beyond[:, 0] = False  # the most likely token always stays, however small top_p is
        drop |= (p.top_p < 1.0)[:, None] & beyond
    raced = values.masked_fill(drop, float("-inf")) + noise.gather(1, order)
    return order.gather(1, raced.argmax(dim=-1, keepdim=True))[:, 0]


# ------------------------------------------------------------------------------------ noise
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (from Wellons' hash-prospector: shifts 16, 15,
    15 around two multiplies). Both multipliers are below 2**31, so for x < 2**32 the products
    stay below 2**63: exact in int64 on every device, no overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform floats in (0, 1), (B, vocab): a hash of (seed, step, token id) per element, so a
    row's noise depends on nothing but its own seed and step."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    key = _mix32(_mix32(_mix32(lo ^ 0x9E3779B9) ^ hi) ^ (step & _M32))  # (B,)
    ids = torch.arange(vocab, device=seed.device)
    bits = _mix32(key[:, None] ^ ids)  # (B, V); key is already mixed: one round per token suffices
    # 23 bits as odd multiples of 2**-24: every value and 1 - value is exact in float32, so
    # neither log below meets 0
    return ((bits >> 9) * 2 + 1).float() * 2.0**-24


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise (B, vocab): -log(-log(u))."""
    return -torch.log(-torch.log(uniform_noise(seed, step, vocab)))


def top_dicts(logp: torch.Tensor, k: int) -> list[dict[int, float]]:
    """The k most likely ids of each row of log-probabilities (B, V), as {id: logprob}."""
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
