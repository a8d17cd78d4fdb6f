"""Tests for layerscan.stats: bootstrap intervals for mean scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layerscan.metrics import summarize
from layerscan.stats import (
    DEFAULT_RESAMPLES,
    bootstrap_ci,
    cannot_tell_apart,
    one_sided_bound,
    paired_difference_ci,
)

TRUE_MEAN, SPREAD = 0.10, 0.05


def _normal(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(TRUE_MEAN, SPREAD, n)


def test_two_sided_coverage_on_normal_data() -> None:
    """200 repetitions of 30 prompts: the 95 % interval covers the true mean about 93 % of the
    time (the percentile bootstrap's known small-n shortfall). With 200 repetitions the observed
    rate has a standard error of ~1.8 points, so 0.88-0.99 is a >2.5-sigma band; the data and
    seeds are fixed, so the test is deterministic, not flaky."""
    hits = 0
    for rep in range(200):
        low, high = bootstrap_ci(_normal(30, rep), seed=rep)
        hits += low <= TRUE_MEAN <= high
    assert 0.88 <= hits / 200 <= 0.99


def test_one_sided_coverage_on_normal_data() -> None:
    """The pessimistic bound is above the true mean (lower is better) ~95 % of the time, and
    below it for higher-is-better, by symmetry of the same data."""
    above = below = 0
    for rep in range(200):
        values = _normal(30, 1000 + rep)
        above += one_sided_bound(values, lower_is_better=True, seed=rep) >= TRUE_MEAN
        below += one_sided_bound(values, lower_is_better=False, seed=rep) <= TRUE_MEAN
    assert 0.89 <= above / 200 <= 0.995
    assert 0.89 <= below / 200 <= 0.995


def test_interval_width_matches_normal_theory_for_many_prompts() -> None:
    values = _normal(400, 7)
    low, high = bootstrap_ci(values)
    half_width = 1.96 * values.std() / math.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert low < values.mean() < high


def test_deterministic_for_a_seed() -> None:
    values = _normal(25, 3)
    assert bootstrap_ci(values) == bootstrap_ci(values.copy(), seed=0)
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(list(values), seed=1)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=2)
    assert one_sided_bound(values, True) == one_sided_bound(values, True)
    b = _normal(25, 4)
    assert paired_difference_ci(values, b) == paired_difference_ci(values, b)
    assert DEFAULT_RESAMPLES == 2000


def test_chunked_resampling_gives_the_same_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory bounding (drawing resamples in chunks) must not change the numbers."""
    import layerscan.stats as stats

    values = _normal(50, 5)
    whole = bootstrap_ci(values, resamples=500)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 50 * 7)  # 7 resamples per chunk
    assert bootstrap_ci(values, resamples=500) == whole


def test_single_value_collapses() -> None:
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert one_sided_bound([0.3], lower_is_better=True) == 0.3
    assert one_sided_bound([0.3], lower_is_better=False) == 0.3
    assert paired_difference_ci([0.3], [0.1]) == pytest.approx((0.2, 0.2))
    assert cannot_tell_apart([0.3], [0.3])
    assert not cannot_tell_apart([0.3], [0.1])  # follows the collapsed interval


def test_constant_values_collapse_to_the_value() -> None:
    assert bootstrap_ci([0.25] * 8) == (0.25, 0.25)
    assert one_sided_bound([0.1] * 7, lower_is_better=True) == summarize(
        [{"lpips": 0.1}] * 7).mean["lpips"]


def test_nan_propagates() -> None:
    values = [0.1, math.nan, 0.2]
    low, high = bootstrap_ci(values)
    assert math.isnan(low) and math.isnan(high)
    assert math.isnan(one_sided_bound(values, lower_is_better=True))
    assert all(math.isnan(v) for v in paired_difference_ci(values, [0.1, 0.1, 0.1]))
    assert not cannot_tell_apart(values, [0.1, 0.1, 0.1])


def test_infinite_scores_give_infinite_ends_not_nan() -> None:
    """rel_l2 is inf on a black reference; an interval end may be inf but never NaN."""
    low, high = bootstrap_ci([0.1, 0.2, math.inf, 0.15])
    assert high == math.inf and math.isfinite(low)
    assert one_sided_bound([0.1, math.inf], lower_is_better=True) == math.inf


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_bound_is_never_optimistic_about_the_mean(lower_is_better: bool) -> None:
    """Passing by the bound implies passing by the mean (the mean ``summarize`` reports), for
    skewed and tiny samples where a percentile alone can fall on the optimistic side."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(2, 9))
        values = rng.lognormal(-3, 1.5, n) if trial % 2 else rng.integers(0, 2, n).astype(float)
        mean = summarize([{"lpips": float(v)} for v in values]).mean["lpips"]
        bound = one_sided_bound(values, lower_is_better, seed=trial)
        if lower_is_better:
            assert bound >= mean
            for threshold in (bound, np.nextafter(bound, math.inf), mean):
                assert not bound <= threshold or mean <= threshold
        else:
            assert bound <= mean
            for threshold in (bound, np.nextafter(bound, -math.inf), mean):
                assert not bound >= threshold or mean >= threshold


def test_pairing_resolves_a_small_consistent_difference() -> None:
    """Prompts differ a lot (0.02-0.3); the FP8 config is worse by a steady 0.01 on each. The
    paired interval excludes 0 though the two unpaired intervals overlap."""
    rng = np.random.default_rng(8)
    prompt_difficulty = rng.uniform(0.02, 0.3, 20)
    bf16_like = prompt_difficulty + rng.normal(0, 0.002, 20)
    fp8_like = prompt_difficulty + 0.01 + rng.normal(0, 0.002, 20)
    low, high = paired_difference_ci(fp8_like, bf16_like)
    assert 0.0 < low < 0.01 < high < 0.02
    assert not cannot_tell_apart(fp8_like, bf16_like)
    a_low, a_high = bootstrap_ci(fp8_like)
    b_low, b_high = bootstrap_ci(bf16_like)
    assert a_low < b_high and b_low < a_high  # unpaired: the intervals overlap


def test_same_distribution_cannot_be_told_apart() -> None:
    base = _normal(20, 9)
    noise = np.random.default_rng(10).normal(0, 0.01, 20)
    other = base + (noise - noise.mean())  # per-prompt noise, no shift at all in this sample
    low, high = paired_difference_ci(other, base)
    assert low < 0 < high
    assert cannot_tell_apart(other, base)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="one-dimensional"):
        bootstrap_ci([[0.1, 0.2]])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_ci([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=95)
    with pytest.raises(ValueError, match="resamples"):
        one_sided_bound([0.1, 0.2], True, resamples=0)
