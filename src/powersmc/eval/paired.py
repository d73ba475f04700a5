"""Paired statistics for methods run on the same problems and seeds (`powersmc report`).

* Exact McNemar test: of the pairs where exactly one method is right, the count where it is
  method A is Binomial(n_discordant, 1/2) if both are equally accurate; two-sided p-value
  (scipy.stats.binomtest when scipy is installed, else the same exact sum computed here).
* Paired bootstrap: problems are resampled with replacement (all seeds of a problem travel
  together, since answers to one problem are correlated), seeded, B = 2000 resamples; 95%
  percentile intervals for the accuracy difference and for latency ratios.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

BOOTSTRAP = 2000
SEED = 0

Key = tuple[str, int]  # (problem_id, seed)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n Binomial(n, 1/2) trials:
    min(1, 2 P(X <= min(k, n - k)))."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    try:
        from scipy.stats import binomtest
    except ImportError:
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2**n)
    return float(binomtest(m, n, 0.5).pvalue)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test on paired outcomes: discordant counts and the two-sided p-value."""
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return {"n": len(a), "a_only": a_only, "b_only": b_only,
            "p_value": binomial_two_sided(a_only, a_only + b_only)}


def _clusters(keys: Sequence[Key]) -> list[list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (problem, _) in enumerate(keys):
        groups[problem].append(i)
    return list(groups.values())


def bootstrap_ci(keys: Sequence[Key], stat: Callable[[np.ndarray], np.ndarray],
                 reps: int = BOOTSTRAP, seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of `stat` over problem-level bootstrap resamples.

    `stat` receives an index matrix [reps, m] into the pairs (m = pairs of a resample; short
    rows are padded with -1 when problems hold different numbers of seeds) and returns [reps].
    """
    clusters = _clusters(keys)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(clusters), size=(reps, len(clusters)))
    width = max(len(c) for c in clusters)
    table = np.full((len(clusters), width), -1)
    for i, c in enumerate(clusters):
        table[i, : len(c)] = c
    idx = table[picks].reshape(reps, -1)
    values = stat(idx)
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _masked(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[idx] with NaN where idx is padding (-1)."""
    return np.where(idx >= 0, x[np.maximum(idx, 0)], np.nan)


def accuracy_difference(a: Sequence[bool], b: Sequence[bool], keys: Sequence[Key]) -> dict:
    """Accuracy of A minus that of B on the same pairs, with its paired bootstrap interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    ci = bootstrap_ci(keys, lambda idx: np.nanmean(_masked(d, idx), axis=1))
    return {"difference": float(d.mean()), "ci95": ci}


def latency_ratios(m: Sequence[float], base: Sequence[float], keys: Sequence[Key]) -> dict:
    """Median of per-pair latency ratios and ratio of total times, each with its interval."""
    x, y = np.asarray(m, dtype=float), np.asarray(base, dtype=float)
    r = x / y
    return {
        "median": float(np.median(r)),
        "median_ci95": bootstrap_ci(keys, lambda idx: np.nanmedian(_masked(r, idx), axis=1)),
        "total": float(x.sum() / y.sum()),
        "total_ci95": bootstrap_ci(keys, lambda idx: np.nansum(_masked(x, idx), axis=1)
                                   / np.nansum(_masked(y, idx), axis=1)),
    }


def compare(results_a: dict[Key, dict], results_b: dict[Key, dict]) -> dict | None:
    """Paired statistics of method A against method B on their common (problem, seed) keys."""
    keys = sorted(set(results_a) & set(results_b))
    if not keys:
        return None
    a = [bool(results_a[k]["correct"]) for k in keys]
    b = [bool(results_b[k]["correct"]) for k in keys]
    return {**mcnemar(a, b), **accuracy_difference(a, b, keys)}
