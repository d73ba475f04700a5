"""Monte Carlo tolerances for the exactness tests.

Every check is a z-test whose threshold is derived from the number of simultaneous
comparisons (Bonferroni at family-wise error 1e-3), never tuned to make a test pass.
"""

from __future__ import annotations

import math
from statistics import NormalDist

FAMILY_ERROR = 1e-3


def z_threshold(comparisons: int, family_error: float = FAMILY_ERROR) -> float:
    """Two-sided Bonferroni threshold for `comparisons` simultaneous z-tests."""
    return NormalDist().inv_cdf(1 - family_error / (2 * max(comparisons, 1)))


def weighted_frequency_z(
    draws: list[tuple[int, ...]],
    weights: list[float],
    target: dict[tuple[int, ...], float],
    min_expected: float = 5.0,
) -> tuple[dict[tuple[int, ...], float], float]:
    """Ratio estimate pi_hat(y) = sum_r w_r 1[y_r = y] / sum_r w_r and the largest |z| against
    `target`, with the delta-method standard error computed under the null.

    As in a chi-square goodness-of-fit test, outcomes with expected count R * target(y) below
    `min_expected` are pooled into one bin (tested if the pool itself reaches `min_expected`):
    the normal approximation does not hold for rarer cells. Returns (pi_hat, max |z|).
    """
    R = len(draws)
    mean_w = sum(weights) / R
    est: dict[tuple[int, ...], float] = {}
    for y, w in zip(draws, weights, strict=True):
        est[y] = est.get(y, 0.0) + w / (R * mean_w)
    common = {y for y, p in target.items() if R * p >= min_expected}
    bins = [{y} for y in common]
    rare_mass = sum(p for y, p in target.items() if y not in common)
    if R * rare_mass >= min_expected:
        bins.append(set(target) - common)
    worst = 0.0
    for cell in bins:
        p = sum(target[y] for y in cell)
        hit = [yy in cell for yy in draws]
        res = [w * (h - p) for h, w in zip(hit, weights, strict=True)]
        m = sum(res) / R
        se = math.sqrt(sum((x - m) ** 2 for x in res) / (R - 1) / R) / mean_w
        worst = max(worst, abs(m / mean_w) / se if se > 0 else (math.inf if m else 0.0))
    unseen = [y for y in est if y not in target]
    return est, (math.inf if unseen else worst)


def num_cells(target: dict[tuple[int, ...], float], R: int, min_expected: float = 5.0) -> int:
    """How many z-tests `weighted_frequency_z` makes (for the Bonferroni threshold)."""
    return sum(R * p >= min_expected for p in target.values()) + 1


def mean_z(values: list[float], expected: float) -> float:
    """|mean - expected| in standard errors of the mean."""
    R = len(values)
    m = sum(values) / R
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (R - 1))
    return abs(m - expected) / (sd / math.sqrt(R))
