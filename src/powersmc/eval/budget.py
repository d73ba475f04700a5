"""Equal compute (`powersmc eval --budget N`): every method spends about the mean token
evaluations per problem of Power-SMC with N particles.

Each method has one knob that buys compute (`KNOBS`): particles or samples for the particle
methods and the vote, moves for the MH family and PPT, rollouts for Scalable Power Sampling.
Its cost is about linear in the knob, a + b k, with a and b depending on the model, the
problems and the method's other settings; so the knob is calibrated on the run's first
problems: Power-SMC with N particles gives the target, each method runs at two knob values,
and the line through the two mean costs gives the knob that meets the target. Costs count
every token evaluation (rejected proposals and rollouts included: the scheduler's accounting).
The calibration is recorded in the run's config, so a resumed run uses the same knobs.
Decoding baselines (plain, lowtemp, greedy) draw one answer and keep their own cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.eval.grading import answer_key
from powersmc.eval.problem import Problem
from powersmc.eval.units import derived_seed
from powersmc.methods.registry import method_program
from powersmc.runtime.api import run_programs

CALIBRATION_PROBLEMS = 8
REFINE = 3  # secant steps after the two calibration points
TOLERANCE = 0.05  # stop refining within this relative distance of the target
SLACK = 1.25  # a method whose smallest knob costs more than this times the target cannot meet it

# method -> (knob, smallest value, the two calibration points as functions of N)
KNOBS: dict[str, tuple[str, int, Callable[[int], tuple[int, int]]]] = {
    **{m: ("particles", 1, lambda n: (n, n)) for m in ("smc", "smc-adapted", "ccps")},
    "smc-rm": ("particles", 1, lambda n: (max(1, n // 4), max(2, n // 2))),
    "bon": ("bon_samples", 1, lambda n: (max(1, n // 2), n)),
    "maj": ("maj_samples", 1, lambda n: (max(1, n // 2), n)),
    **{m: ("mh_moves", 0, lambda n: (1, 4)) for m in ("mh", "mh-faithful", "ecmh",
                                                     "ecmh-faithful", "ppt")},
    "spower": ("rollouts", 1, lambda n: (1, 4)),
}


def mean_cost(lm: LanguageModel, problems: list[Problem], prompts: list[str], method: str,
              settings: dict[str, Any]) -> float:
    """Mean token evaluations per problem of `method` (seed 0's derived seeds), all problems'
    programs in flight in one scheduler."""
    out = run_programs(lm, [method_program(
        method, lm, prompt, alpha=settings["alpha"], max_new_tokens=settings["max_new_tokens"],
        seed=derived_seed(0, p.id), **settings["options"],
        key=lambda text, kind=p.kind: answer_key(text, kind))
        for p, prompt in zip(problems, prompts, strict=True)])
    return sum(r.cost.token_evals for r in out) / len(out)


def calibrate(lm: LanguageModel, problems: list[Problem], prompts: list[str],
              methods: list[str], budget: int, alpha: float, max_new_tokens: int,
              options: dict[str, Any],
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The knob of every method for `budget` (see the module docstring): {'target': mean
    token-evals of Power-SMC with N = budget, 'knobs': {method: {knob: value}},
    'points': {method: [[k, cost], [k, cost]]}}. Raises `InputError` naming --budget when a
    method cannot meet it."""
    problems = problems[:CALIBRATION_PROBLEMS]
    prompts = prompts[:CALIBRATION_PROBLEMS]
    base = {"alpha": alpha, "max_new_tokens": max_new_tokens, "options": dict(options)}

    def cost(method: str, knob: str, k: int) -> float:
        s = {**base, "options": {**options, knob: k}}
        c = mean_cost(lm, problems, prompts, method, s)
        progress(f"budget: {method} {knob}={k}: {c:.0f} token-evals per problem")
        return c

    target = cost("smc", "particles", budget)
    knobs: dict[str, dict[str, int]] = {}
    points: dict[str, list[list[float]]] = {}
    for m in methods:
        if m not in KNOBS:
            continue
        knob, least, at = KNOBS[m]
        k1, k2 = at(budget)
        if k1 == k2:  # Power-SMC itself (and its presets): N particles by definition
            knobs[m] = {knob: budget}
            continue
        pts = [(k1, cost(m, knob, k1)), (k2, cost(m, knob, k2))]
        (ka, ca), (kb, cb) = pts
        slope = (cb - ca) / (kb - ka)
        floor = ca + slope * (least - ka)
        if floor > SLACK * target:
            raise InputError("--budget", f"a budget {m} can meet: at its smallest {knob} "
                             f"({least}) it costs {floor:.0f} token-evals per problem, Power-SMC "
                             f"with N = {budget} costs {target:.0f}", budget)
        near = lambda p: abs(p[1] - target)  # noqa: E731
        for _ in range(REFINE):  # secant steps through the two points nearest the target
            if near(min(pts, key=near)) <= TOLERANCE * target:
                break
            k = least if slope <= 0 else max(least, round(ka + (target - ca) / slope))
            if k in dict(pts):
                break
            pts.append((k, cost(m, knob, k)))
            (ka, ca), (kb, cb) = sorted(pts, key=near)[:2]
            slope = (cb - ca) / (kb - ka)
        best = min(pts, key=near)
        points[m] = [[k, c] for k, c in pts]
        knobs[m] = {knob: int(best[0])}
    return {"particles": budget, "target": target, "knobs": knobs, "points": points,
            "problems": [p.id for p in problems]}


def check_budget(budget: int | None) -> int | None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget < 1):
        raise InputError("--budget", "an integer >= 1 (Power-SMC's particles N)", budget)
    return budget

