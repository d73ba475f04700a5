"""Enumerable toy LMs and the raw-output statistics the statistical benchmarks report.

Shared by `adapted_order.py` and `resample_align.py`: each compares SMC schedules at equal N
by the law of the drawn answer against pi_alpha enumerated exactly, over many seeded runs.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

from powersmc import FunctionLM, smc_sample_many
from powersmc.exact import power_distribution, total_variation

ALPHA = 4.0
PROMPT = [3]


def _trap(prefix: tuple[int, ...]) -> list[float]:
    """The trap of tests/toy_models.py: A is rare but confident, B likely but uncertain."""
    gen = prefix[1:]
    if not gen:
        return [math.log(1e-3), math.log(0.4), math.log(0.6 - 1e-3), -math.inf]
    if gen[0] == 1:
        return [math.log(0.3), math.log(0.65), math.log(0.03), math.log(0.02)]
    return [math.log(0.25)] * 4


def _random(concentration: float) -> Callable[[tuple[int, ...]], list[float]]:
    def logits(prefix: tuple[int, ...]) -> list[float]:
        rng = random.Random(hash(prefix) ^ 0x5EED)
        return [math.log(rng.gammavariate(concentration, 1.0) + 1e-9) for _ in range(4)]
    return logits


TOYS = {  # name: (conditionals, horizon); token 0 is EOS, so lengths vary
    "trap (T=4)": (_trap, 4),
    "random (T=4)": (_random(0.6), 4),
    "random (T=7)": (_random(1.0), 7),
}


def mc_floor(pi: dict, runs: int, reps: int = 20) -> float:
    """Mean TV of the empirical distribution of `runs` exact draws from pi (the MC floor)."""
    keys, probs = list(pi), list(pi.values())
    rng = random.Random(0)
    tvs = []
    for _ in range(reps):
        c = Counter(rng.choices(range(len(keys)), probs, k=runs))
        tvs.append(total_variation({keys[i]: n / runs for i, n in c.items()}, pi))
    return statistics.fmean(tvs)


def toy(name: str) -> tuple[FunctionLM, int, dict, float]:
    """The toy LM `name`, its horizon, pi_alpha over its answers and log Z, enumerated."""
    fn, horizon = TOYS[name]
    lm = FunctionLM(fn, vocab_size=4, eos_token_ids=[0])
    pi, log_z = power_distribution(lm, PROMPT, horizon, ALPHA)
    return lm, horizon, pi, log_z


def raw_output_stats(name: str, particles: int, runs: int, **smc: Any) -> dict[str, Any]:
    """`runs` seeded Power-SMC runs on toy `name` (seeds 1000.., the same for every setting
    compared): TV of the drawn answer's empirical law to pi_alpha, var log Z_hat, mean
    Z_hat / Z (1 when unbiased) and resamplings per run."""
    lm, horizon, pi, log_z = toy(name)
    out = []
    for k in range(0, runs, 500):
        out += smc_sample_many(lm, [PROMPT] * min(500, runs - k), alpha=ALPHA,
                               particles=particles, max_new_tokens=horizon, seed=1_000 + k,
                               **smc)
    emp = Counter(tuple(r.token_ids) for r in out)
    lz = [r.log_z - log_z for r in out]
    return {"model": name, "N": particles, "runs": runs,
            "tv_raw": total_variation({k: v / runs for k, v in emp.items()}, pi),
            "var_log_z": statistics.variance(lz),
            "mean_z_ratio": statistics.fmean(math.exp(v) for v in lz),
            "resamples_per_run": statistics.fmean(len(r.resample_steps) for r in out)}
