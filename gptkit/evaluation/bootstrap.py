"""Bootstrap confidence intervals over examples (percentile method).

Resampling the examples with replacement B times and recomputing a statistic shows how much
it would move on another draw of examples of the same size. For differences between models
the same resampled indices are used for every model (a paired bootstrap): the examples'
difficulty is shared, so only the models' disagreement is left as noise. A model compared
with itself gets a difference of exactly 0 on every resample.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LEVEL = 0.95


def resamples(n: int, rounds: int, seed: int = 0) -> np.ndarray:
    """rounds rows of n indices drawn with replacement from range(n): (rounds, n)."""
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def interval(values, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of the bootstrap values."""
    lo, hi = np.quantile(np.asarray(values, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def estimate(point: float, values) -> dict[str, float]:
    lo, hi = interval(values)
    return {"value": float(point), "lo": lo, "hi": hi}


def mean_ci(values: list[float], rounds: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of values with its bootstrap interval."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return {"value": float("nan"), "lo": float("nan"), "hi": float("nan")}
    return estimate(x.mean(), x[resamples(len(x), rounds, seed)].mean(axis=1))


def paired(metric: Callable[[int, list[int]], dict[str, float]], n_models: int, n: int, rounds: int = 1000,
           seed: int = 0) -> tuple[list[dict], list[dict]]:
    """metric(model, indices) -> {name: value}. Returns, per model, {name: estimate} of its
    metrics, and, per model, {name: estimate} of its difference from model 0 (empty for 0)."""
    full = list(range(n))
    points = [metric(m, full) for m in range(n_models)]
    draws: list[list[dict]] = [[] for _ in range(n_models)]
    for idx in resamples(n, rounds, seed).tolist():
        for m in range(n_models):
            draws[m].append(metric(m, idx))
    values = [{k: estimate(v, [d[k] for d in draws[m]]) for k, v in points[m].items()} for m in range(n_models)]
    diffs = [{} if m == 0 else
             {k: estimate(points[m][k] - points[0][k], [d[k] - d0[k] for d, d0 in zip(draws[m], draws[0])])
              for k in points[m]} for m in range(n_models)]
    return values, diffs
