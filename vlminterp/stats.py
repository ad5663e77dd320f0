"""Seeded resampling statistics: permutation p-values and percentile bootstrap intervals.

Convention for every Monte-Carlo permutation p-value in the project (Phipson & Smyth 2010):
``p = (count(null >= observed) + 1) / (len(null) + 1)`` — the observed arrangement counts as one
of the permutations, so ``p`` is never 0 and the test is valid (P(p <= a) <= a under the null).
As in ``scipy.stats.permutation_test``, null values within 100 ulps of ``observed`` count as
ties (>=), so a permutation that reproduces the observed split is never lost to rounding.
All randomness comes from ``numpy.random.default_rng(seed)``: same inputs, same seed, same answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import SupportsFloat

import numpy as np
from jaxtyping import Real
from torch import Tensor

Sample = Real[np.ndarray, "_n"] | Real[Tensor, "_n"] | Sequence[SupportsFloat]
_CHUNK = 1 << 22  # elements per vectorised block of resamples (~32 MB of float64)


def _vector(values: Sample, what: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().to("cpu").double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sample, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: the sample holds NaN or infinite values")
    return arr


def permutation_pvalue(observed: SupportsFloat, null: Sample) -> float:
    """``(count(null >= observed) + 1) / (len(null) + 1)``; an empty null gives 1.0."""
    obs = float(observed)
    draws = _vector(null, "null")
    tol = 100 * np.finfo(np.float64).eps * abs(obs)
    return float((np.count_nonzero(draws >= obs - tol) + 1) / (draws.size + 1))


def permutation_test_greater(
    x: Sample, y: Sample, num_permutations: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """One-sided test that ``mean(x) > mean(y)``, permuting the group labels of the pooled sample.

    Returns ``(statistic, pvalue)`` with ``statistic = mean(x) - mean(y)`` and ``pvalue`` the
    share of ``num_permutations`` random relabellings (plus the observed one) whose statistic is
    >= the observed one (`permutation_pvalue`). ``num_permutations=0`` gives ``pvalue = 1.0``.
    """
    xs, ys = _vector(x, "x"), _vector(y, "y")
    if xs.size == 0 or ys.size == 0:
        raise ValueError(f"permutation_test_greater: both groups need values, got {xs.size} and {ys.size}")
    if num_permutations < 0:
        raise ValueError(f"num_permutations: expected >= 0, got {num_permutations}")
    observed = float(xs.mean() - ys.mean())
    pooled = np.concatenate([xs, ys])
    total, nx, ny = pooled.sum(), xs.size, ys.size
    rng = np.random.default_rng(seed)
    null = np.empty(num_permutations)
    step = max(1, _CHUNK // pooled.size)
    for start in range(0, num_permutations, step):
        rows = min(step, num_permutations - start)
        shuffled = rng.permuted(np.broadcast_to(pooled, (rows, pooled.size)), axis=1)
        sx = shuffled[:, :nx].sum(axis=1)
        null[start:start + rows] = sx / nx - (total - sx) / ny
    return observed, permutation_pvalue(observed, null)


def bootstrap_ci(
    values: Sample,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[..., SupportsFloat] = np.mean,
) -> tuple[float, float, float]:
    """Percentile bootstrap: ``(statistic(values), lo, hi)``.

    Draws ``num_resamples`` resamples of ``len(values)`` with replacement, computes ``statistic``
    on each, and returns the ``(1 - confidence)/2`` and ``(1 + confidence)/2`` percentiles of those
    (linear interpolation, as ``scipy.stats.bootstrap(method='percentile')``). ``statistic`` is
    called with ``axis=-1`` on a block of resamples when it accepts that, else once per resample.
    """
    arr = _vector(values, "values")
    if arr.size == 0:
        raise ValueError("bootstrap_ci: values is empty")
    if num_resamples < 1:
        raise ValueError(f"num_resamples: expected >= 1, got {num_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    boot = np.empty(num_resamples)
    step = max(1, _CHUNK // arr.size)
    for start in range(0, num_resamples, step):
        rows = min(step, num_resamples - start)
        block = arr[rng.integers(0, arr.size, size=(rows, arr.size))]
        boot[start:start + rows] = _apply(statistic, block)
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return float(statistic(arr)), float(lo), float(hi)


def _apply(statistic: Callable[..., SupportsFloat], block: np.ndarray) -> np.ndarray:
    try:
        out = np.asarray(statistic(block, axis=-1), dtype=np.float64)
        if out.shape == (block.shape[0],):
            return out
    except TypeError:  # the statistic takes no axis argument
        pass
    return np.array([float(statistic(row)) for row in block])
