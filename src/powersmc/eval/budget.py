"""Equal compute (`powersmc eval --budget N`): every method spends about the mean token
evaluations per problem of Power-SMC with N particles.

Each method has one knob that buys compute (`KNOBS`): particles or samples for the particle
methods and the vote, moves for the MH family and PPT, rollouts for Scalable Power Sampling.
Its cost is about linear in the knob, a + b k, with a and b depending on the model, the
problems and the method's other settings; so the knob is calibrated on the run's first
problems: Power-SMC with N particles gives the target, each method runs at two knob values,
and the line through the two mean costs gives the knob that meets the target. Costs count
every token evaluation (rejected proposals and rollouts included: the scheduler's accounting).
The calibration is recorded in the run's config, so a resumed run uses the same knobs; it
runs in this process or on the run's Ray workers, with the same figures.
Decoding baselines (plain, lowtemp, greedy) draw one answer and keep their own cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.eval.grading import answer_key
from powersmc.eval.problem import Problem
from powersmc.eval.units import Settings, Unit, derived_seed
from powersmc.methods.registry import method_program
from powersmc.runtime.api import run_programs

if TYPE_CHECKING:
    from powersmc.eval.ray_pool import WorkerPool

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


Point = tuple[str, dict[str, Any]]  # a method and its options
Costs = Callable[[list[Point]], list[float]]  # mean token-evals per problem of each point


def in_process_costs(lm: LanguageModel, problems: list[Problem], prompts: list[str],
                     alpha: float, max_new_tokens: int) -> Costs:
    """Costs measured here: every point's programs on every problem (seed 0's derived seeds)
    in flight in one scheduler. A program's token-evals do not depend on what shares its
    batch, so the figures are those of each point run alone."""
    def costs(points: list[Point]) -> list[float]:
        out = run_programs(lm, [method_program(
            method, lm, prompt, alpha=alpha, max_new_tokens=max_new_tokens,
            seed=derived_seed(0, p.id), **options,
            key=lambda text, kind=p.kind: answer_key(text, kind))
            for method, options in points for p, prompt in zip(problems, prompts, strict=True)])
        n = len(problems)
        return [sum(r.cost.token_evals for r in out[i * n : (i + 1) * n]) / n
                for i in range(len(points))]
    return costs


def worker_costs(pool: WorkerPool, problems: list[Problem], prompts: list[str], alpha: float,
                 max_new_tokens: int) -> Costs:
    """Costs measured on Ray workers: each point one batched unit of the problems (seed 0,
    as in process), the points of a round spread over the workers."""
    def costs(points: list[Point]) -> list[float]:
        jobs = [(Unit(m, 0, tuple(problems), tuple(prompts), batched=True),
                 Settings(alpha, max_new_tokens, options)) for m, options in points]
        return [sum(r["token_evals"] for r in rows) / len(problems)
                for rows in pool.run_each(jobs)]
    return costs


def calibrate(costs: Costs, methods: list[str], budget: int, options: dict[str, Any],
              problems: list[str],
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The knob of every method for `budget` (see the module docstring), measured by `costs`
    on the calibration problems (ids `problems`): {'target': mean token-evals of Power-SMC
    with N = budget, 'knobs': {method: {knob: value}}, 'points': {method: [[k, cost], ...]}}.
    Every round's points are measured in one call (all methods' first two points, then each
    unsettled method's next secant point), so workers or one batch take them together.
    Raises `InputError` naming --budget when a method cannot meet it."""
    def measure(points: list[tuple[str, str, int]]) -> list[float]:
        got = costs([(m, {**options, knob: k}) for m, knob, k in points])
        for (m, knob, k), c in zip(points, got, strict=True):
            progress(f"budget: {m} {knob}={k}: {c:.0f} token-evals per problem")
        return got

    tuned = [m for m in methods if m in KNOBS and len(set(KNOBS[m][2](budget))) == 2]
    first = [(m, KNOBS[m][0], k) for m in tuned for k in KNOBS[m][2](budget)]
    target, *found = measure([("smc", "particles", budget), *first])
    pts: dict[str, list[tuple[int, float]]] = {m: [] for m in tuned}
    for (m, _, k), c in zip(first, found, strict=True):
        pts[m].append((k, c))
    near = lambda p: abs(p[1] - target)  # noqa: E731
    for m in tuned:
        knob, least, _ = KNOBS[m]
        (ka, ca), (kb, cb) = pts[m]
        floor = ca + (cb - ca) / (kb - ka) * (least - ka)
        if floor > SLACK * target:
            raise InputError("--budget", f"a budget {m} can meet: at its smallest {knob} "
                             f"({least}) it costs {floor:.0f} token-evals per problem, Power-SMC "
                             f"with N = {budget} costs {target:.0f}", budget)
    for _ in range(REFINE):  # secant steps through each method's two points nearest the target
        step = []
        for m in tuned:
            if near(min(pts[m], key=near)) <= TOLERANCE * target:
                continue
            (ka, ca), (kb, cb) = sorted(pts[m], key=near)[:2]
            slope = (cb - ca) / (kb - ka)
            least = KNOBS[m][1]
            k = least if slope <= 0 else max(least, round(ka + (target - ca) / slope))
            if k not in dict(pts[m]):
                step.append((m, KNOBS[m][0], k))
        if not step:
            break
        for (m, _, k), c in zip(step, measure(step), strict=True):
            pts[m].append((k, c))
    knobs = {m: {KNOBS[m][0]: budget} for m in methods if m in KNOBS and m not in tuned}
    knobs.update({m: {KNOBS[m][0]: int(min(pts[m], key=near)[0])} for m in tuned})
    return {"particles": budget, "target": target, "knobs": knobs,
            "points": {m: [[k, c] for k, c in pts[m]] for m in tuned}, "problems": problems}


def check_budget(budget: int | None) -> int | None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget < 1):
        raise InputError("--budget", "an integer >= 1 (Power-SMC's particles N)", budget)
    return budget

