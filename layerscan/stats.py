"""Temporary stand-in (replaced by the real module)."""
from __future__ import annotations
import math
import numpy as np

def bootstrap_ci(values, level=0.95, resamples=2000, seed=0):
    v = np.asarray(values, dtype=float)
    if len(v) == 0: return (math.nan, math.nan)
    if np.isnan(v).any(): return (math.nan, math.nan)
    if len(v) == 1: return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))

def one_sided_bound(values, lower_is_better, level=0.95):
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    lo, hi = bootstrap_ci(v, level=1 - 2 * (1 - level))
    return max(m, hi) if lower_is_better else min(m, lo)

def paired_difference_ci(a, b, level=0.95):
    return bootstrap_ci(np.asarray(a, float) - np.asarray(b, float), level)
