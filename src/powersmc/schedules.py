"""Exponent-bridging schedules for exact alpha-ramping (paper Sec. 5.3, App. B).

A schedule maps a token index t = 1, 2, ... to the exponent alpha_t used for the incremental
weight of token t (eq. 8 with alpha replaced by alpha^(l)). Between tokens where the exponent
changes, the sampler applies the bridge  log W += (alpha_t - alpha_{t-1}) * log p(y_{1:t-1}),
so the final target stays p^alpha whatever the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from powersmc.errors import InputError

Schedule = Callable[[int], float]


def constant(alpha: float) -> Schedule:
    """No ramping: every token uses the final exponent."""
    return lambda t: alpha


def linear_ramp(alpha: float, ramp_tokens: int) -> Schedule:
    """alpha_t = 1 + (alpha - 1) * min(t, R) / R: the paper's linear schedule over R tokens."""
    if ramp_tokens <= 0:
        return constant(alpha)
    return lambda t: 1.0 + (alpha - 1.0) * min(t, ramp_tokens) / ramp_tokens


def from_values(values: Sequence[float], alpha: float) -> Schedule:
    """A user schedule given as alpha_1, alpha_2, ...; after the list ends, the final alpha."""
    vals = [float(v) for v in values]
    if any(not math.isfinite(v) or v < 1.0 or v > alpha for v in vals):
        raise InputError("alpha_schedule", f"values must lie in [1, alpha={alpha}]", values)
    return lambda t: vals[t - 1] if t <= len(vals) else alpha


def make_schedule(
    alpha: float, ramp_tokens: int = 0, alpha_schedule: Schedule | Sequence[float] | None = None
) -> Schedule:
    """The schedule a sampler uses: a user schedule if given, else linear over ramp_tokens."""
    if alpha_schedule is None:
        return linear_ramp(alpha, ramp_tokens)
    if callable(alpha_schedule):
        return alpha_schedule
    return from_values(alpha_schedule, alpha)
