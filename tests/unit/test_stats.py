"""vlminterp.stats against hand counts, exact enumeration and scipy.stats."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats as sps

from vlminterp.stats import bootstrap_ci, permutation_pvalue, permutation_test_greater


def _mean_diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _exact_greater(x, y):
    """Exact one-sided p-value by enumerating every split of the pooled sample."""
    pooled, nx = np.concatenate([x, y]), len(x)
    obs = np.mean(x) - np.mean(y)
    stats = []
    for idx in itertools.combinations(range(len(pooled)), nx):
        mask = np.zeros(len(pooled), bool)
        mask[list(idx)] = True
        stats.append(pooled[mask].mean() - pooled[~mask].mean())
    stats = np.array(stats)
    return float(np.mean(stats >= obs - 1e-12))


def test_pvalue_counts_observed_as_one_permutation():
    assert permutation_pvalue(2.0, [0.0, 1.0, 2.0, 3.0]) == pytest.approx(3 / 5)
    assert permutation_pvalue(10.0, np.zeros(99)) == pytest.approx(1 / 100)
    assert permutation_pvalue(-1.0, torch.zeros(9)) == 1.0
    assert permutation_pvalue(0.5, []) == 1.0  # no permutations: no evidence


def test_pvalue_counts_rounding_ties_as_ties():
    # 0.1 + 0.2 > 0.3 in floating point; a permuted statistic that equals the observed one up to
    # summation order must still count.
    assert permutation_pvalue(0.1 + 0.2, [0.3]) == 1.0
    assert permutation_pvalue(0.3 + 1e-9, [0.3]) == 0.5


@pytest.mark.parametrize("x, y", [
    ([1.2, 3.4, 2.2, 5.0], [0.1, 0.7, 1.9, 2.5, -0.3]),
    ([1.0, 1.0, 2.0, 3.0], [1.0, 2.0, 2.0, 1.0]),          # heavy ties
    ([0.3, -0.2, 0.1], [0.4, 0.0, -0.1, 0.2, 0.25, -0.3]),   # no effect
])
def test_permutation_test_matches_exact_enumeration_and_scipy(x, y):
    x, y = np.array(x), np.array(y)
    exact = _exact_greater(x, y)
    ref = sps.permutation_test((x, y), _mean_diff, permutation_type="independent", vectorized=True,
                               alternative="greater", n_resamples=np.inf)
    assert ref.pvalue == pytest.approx(exact)
    perms = 20000
    stat, p = permutation_test_greater(x, y, num_permutations=perms, seed=3)
    assert stat == pytest.approx(ref.statistic)
    se = np.sqrt(exact * (1 - exact) / perms)
    assert abs(p - exact) <= 4 * se + 1 / (perms + 1)


def test_permutation_test_matches_scipy_monte_carlo():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.4, 1, 30), rng.normal(0, 1, 25)
    ref = sps.permutation_test((x, y), _mean_diff, permutation_type="independent", vectorized=True,
                               alternative="greater", n_resamples=9999, random_state=1)
    _, p = permutation_test_greater(x, y, num_permutations=9999, seed=2)
    assert 0.01 < ref.pvalue < 0.99  # a case where the p-value is not pinned at its floor
    assert abs(p - ref.pvalue) < 5 * np.sqrt(ref.pvalue * (1 - ref.pvalue) / 9999) * np.sqrt(2)


def test_permutation_test_is_seeded_floored_and_valid():
    x, y = np.arange(10.0) + 100, np.arange(12.0)
    assert permutation_test_greater(x, y, 99, seed=0) == permutation_test_greater(x, y, 99, seed=0)
    assert permutation_test_greater(x, y, 99, seed=0)[1] == pytest.approx(1 / 100)  # never 0
    assert permutation_test_greater(y, x, 99, seed=0)[1] == 1.0
    assert permutation_test_greater(x, y, 0, seed=0)[1] == 1.0
    # Under the null, P(p <= 0.1) <= 0.1 (up to sampling noise over 300 data sets).
    rng = np.random.default_rng(1)
    ps = [permutation_test_greater(rng.normal(size=8), rng.normal(size=11), 49, seed=s)[1] for s in range(300)]
    assert np.mean(np.array(ps) <= 0.1) < 0.16
    assert np.mean(np.array(ps) <= 0.5) > 0.4


def test_permutation_test_rejects_bad_input():
    with pytest.raises(ValueError, match="both groups"):
        permutation_test_greater([], [1.0])
    with pytest.raises(ValueError, match="num_permutations"):
        permutation_test_greater([1.0], [2.0], num_permutations=-1)
    with pytest.raises(ValueError, match="NaN"):
        permutation_test_greater([1.0, float("nan")], [2.0])


def test_bootstrap_exact_on_a_tiny_sample():
    # Means of 3 draws from {1, 4, 10}: P(mean=1) = P(mean=10) = 1/27 < 5%, P(mean<=2) = 4/27 and
    # P(mean>=8) = 4/27 > 5%, so the exact 90% percentile interval is [2, 8].
    est, lo, hi = bootstrap_ci([1.0, 4.0, 10.0], num_resamples=20000, confidence=0.9, seed=0)
    assert (est, lo, hi) == (5.0, 2.0, 8.0)
    ref = sps.bootstrap(([1.0, 4.0, 10.0],), np.mean, method="percentile", confidence_level=0.9,
                        n_resamples=20000, random_state=0)
    assert (ref.confidence_interval.low, ref.confidence_interval.high) == (2.0, 8.0)


@pytest.mark.parametrize("statistic", [np.mean, np.median])
def test_bootstrap_matches_scipy_percentile(statistic):
    values = np.random.default_rng(5).normal(1.0, 2.0, 40)
    est, lo, hi = bootstrap_ci(values, num_resamples=20000, confidence=0.95, seed=1, statistic=statistic)
    ref = sps.bootstrap((values,), statistic, method="percentile", confidence_level=0.95,
                        n_resamples=20000, random_state=2).confidence_interval
    assert est == pytest.approx(float(statistic(values)))
    assert lo == pytest.approx(ref.low, abs=0.08) and hi == pytest.approx(ref.high, abs=0.08)
    assert lo < est < hi


def test_bootstrap_statistic_without_axis_and_seeding():
    values = np.random.default_rng(6).exponential(size=25)
    vectorised = bootstrap_ci(values, 500, seed=4, statistic=np.max)
    per_row = bootstrap_ci(values, 500, seed=4, statistic=lambda v: float(np.max(v)))
    assert vectorised == per_row  # same draws whichever way the statistic is applied
    assert bootstrap_ci(values, 500, seed=4) != bootstrap_ci(values, 500, seed=5)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(values, confidence=1.5)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
