"""Bootstrap confidence intervals for mean scores over prompts (and seeds).

A configuration's quality is the mean of per-prompt scores over a handful of prompts (typically
4-50), and per-prompt LPIPS, SSIM or accuracy values are skewed, bounded and sometimes binary, so
a normal-theory interval's shape assumption does not hold. The percentile bootstrap assumes no
shape: resample the prompts with replacement, recompute the mean, and read the interval off the
quantiles of those resampled means.

Its known limits, so numbers are read right:

* With few prompts the interval is too narrow: it uses the plug-in spread (divisor n, not n-1)
  and normal rather than t quantiles. For normal data and a nominal 95 % interval, coverage is
  about 93 % at n = 30 and about 89 % at n = 10; below ~10 prompts, treat it as optimistic.
* With one value there is nothing to resample: every interval collapses to that value. That
  is a statement about the data, not a confident one -- no spread can be estimated from one
  prompt -- and the functions return the value rather than raising so that callers need no
  special case; a report should show n beside an interval.
* NaN anywhere (a failed score) makes the result NaN: a mean with a missing term is unknown, and
  NaN is never mistaken for a good score downstream (``layerscan.metrics.summarize`` does the same).

Resamples. ``DEFAULT_RESAMPLES = 2000``. The interval's end is a sample quantile of B resampled
means, so it carries Monte-Carlo error on top of the sampling error it describes: for a 95 %
two-sided interval, the tail probability actually cut off is 0.025 +- sqrt(0.025 * 0.975 / B) =
0.025 +- 0.0035, and each end moves by about 0.06 standard errors of the mean from seed to seed
(0.045 for the 95 % one-sided bound), about 3 % of the interval's half-width (1.96 standard
errors); measured on normal data, n = 40, 400 seeds. Halving that needs 4x the resamples; it is
small against the interval itself, and the computation stays a few milliseconds. The seed is
fixed (default 0), so the same scores always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_RESAMPLES",
    "bootstrap_ci",
    "cannot_tell_apart",
    "one_sided_bound",
    "paired_difference_ci",
    "ratio_of_medians_ci",
    "ratio_of_summed_medians_ci",
]

DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples per interval; see the module docstring for its Monte-Carlo error."""

_CHUNK_ELEMENTS = 1 << 22
"""Most resample indices drawn at once (32 MiB of int64), so memory stays bounded for large n."""


def _sample(values: Sequence[float] | np.ndarray, label: str = "values") -> np.ndarray:
    """A non-empty 1-D float64 copy; anything else is a caller's mistake."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{label} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{label} is empty: a mean of nothing has no interval")
    return array


def _check(level: float, resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")


def _mean(values: np.ndarray) -> float:
    """The mean exactly as ``layerscan.metrics.summarize`` computes it (``fsum / n``), so that
    comparisons against it here and there agree to the last bit. (``fsum`` raises on ``inf`` and
    ``-inf`` together; numpy's mean gives the NaN that case deserves.)"""
    if not np.isfinite(values).all():
        return float(np.mean(values))
    return math.fsum(values.tolist()) / values.size


def _bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` resamples of ``values`` (with replacement, same size), vectorized.

    Indices are drawn in chunks of whole resamples; a ``Generator`` produces the same stream
    whether its integers are drawn at once or in pieces, so the result does not depend on
    the chunk size, only on (values, resamples, seed).
    """
    n = values.size
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def _quantiles(means: np.ndarray, probabilities: Sequence[float]) -> list[float]:
    """Order statistics of the bootstrap means (``inverted_cdf``: no interpolation, so an
    infinite score gives an infinite end instead of the NaN that ``inf - inf`` would)."""
    return [float(q) for q in np.quantile(means, probabilities, method="inverted_cdf")]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-sided percentile-bootstrap ``level`` confidence interval ``(low, high)`` for the mean.

    One value gives ``(value, value)`` (nothing to resample; see the module docstring); any NaN
    gives ``(nan, nan)``. Deterministic for a given ``seed``.
    """
    _check(level, resamples)
    array = _sample(values)
    if np.isnan(array).any():
        return math.nan, math.nan
    if array.size == 1:
        return float(array[0]), float(array[0])
    tail = (1.0 - level) / 2.0
    low, high = _quantiles(_bootstrap_means(array, resamples, seed), [tail, 1.0 - tail])
    return low, high


def paired_difference_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval for the mean of ``a[i] - b[i]``, for two configurations scored on the same
    prompts and seeds (item i of both is the same prompt and seed).

    Resampling the pairs, not each side on its own, removes the prompt-to-prompt spread both
    share (some prompts are hard for every configuration), so a difference far smaller than
    that spread can still be resolved. Same n=1 and NaN rules as ``bootstrap_ci``.
    """
    first, second = _sample(a, "a"), _sample(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"paired samples need equal lengths, got {first.size} and {second.size}; "
                         "score both configurations on the same prompts and seeds")
    return bootstrap_ci(first - second, level=level, resamples=resamples, seed=seed)


def cannot_tell_apart(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> bool:
    """True when the ``level`` interval of the paired mean difference contains 0: at these
    prompts the data cannot say which configuration is better.

    False with a NaN anywhere (a failed score is not evidence that two configurations are
    alike). With a single pair the interval is that pair's difference, so any nonzero difference
    counts as telling them apart: it follows the interval and adds no judgement of its own; a
    caller deciding from one prompt should say so.
    """
    low, high = paired_difference_ci(a, b, level=level, resamples=resamples, seed=seed)
    return low <= 0.0 <= high  # False when NaN


def one_sided_bound(
    values: Sequence[float] | np.ndarray,
    lower_is_better: bool,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> float:
    """The pessimistic end of the one-sided ``level`` interval for the mean.

    For a lower-is-better metric (LPIPS) the upper bound, never below the mean:
    ``max(mean, q_level)``; for a higher-is-better one (SSIM, PSNR) the lower bound, never above
    it: ``min(mean, q_(1-level))``, with ``q`` the bootstrap quantiles and ``mean`` computed as
    ``layerscan.metrics.summarize`` does. Clamping at the mean makes "passes by the bound" imply
    "passes by the mean" for every threshold, so a search that stops early on the mean cannot
    be contradicted by the bound (a percentile can otherwise land on the optimistic side of the
    mean, for skewed data or by a rounding ulp). One value gives that value; NaN gives NaN.
    """
    _check(level, resamples)
    array = _sample(values)
    if np.isnan(array).any():
        return math.nan
    mean = _mean(array)
    if array.size == 1:
        return mean
    means = _bootstrap_means(array, resamples, seed)
    if lower_is_better:
        return max(mean, _quantiles(means, [level])[0])
    return min(mean, _quantiles(means, [1.0 - level])[0])


def ratio_of_medians_ci(
    numerator: Sequence[float] | np.ndarray,
    denominator: Sequence[float] | np.ndarray,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``median(numerator) / median(denominator)`` and its percentile-bootstrap ``level`` interval,
    the two samples resampled independently (a speed-up: BF16 seconds per image over FP8's,
    measured on different images).  Medians, because one image that waited on something else
    should not move a speed-up.  Fewer than two values on either side give a collapsed interval.
    """
    return ratio_of_summed_medians_ci([numerator], [denominator], level, resamples, seed)


def ratio_of_summed_medians_ci(
    numerators: Sequence[Sequence[float]],
    denominators: Sequence[Sequence[float]],
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``ratio_of_medians_ci`` over strata (a settings matrix's settings, each timed on its own):
    the sum of the numerator's per-stratum medians over the denominator's, every stratum
    resampled within itself, so outputs of different sizes are never pooled into one median."""
    _check(level, resamples)
    a = [_sample(values, "numerator") for values in numerators]
    b = [_sample(values, "denominator") for values in denominators]
    ratio = float(sum(np.median(x) for x in a) / sum(np.median(y) for y in b))
    if any(x.size < 2 for x in a + b):
        return ratio, ratio, ratio
    rng = np.random.default_rng(seed)

    def summed(samples):
        return sum(np.median(x[rng.integers(0, x.size, (resamples, x.size))], axis=1) for x in samples)

    ratios = summed(a) / summed(b)
    tail = (1.0 - level) / 2.0
    low, high = _quantiles(ratios, [tail, 1.0 - tail])
    return ratio, low, high
