"""Work units of an evaluation: what runs, with which seed, and the graded rows each yields.

A unit is one (problem, method, seed), or with `batch_prompts` = P > 1 one method's runs on
up to P problems for a seed, run through one `Scheduler`. The unit list is the same whoever
runs it (in process or on Ray workers) and every (problem, seed) derives its own seed, so its
rows do not depend on which worker ran it, when, or beside which problems (up to the timing
fields `seconds` and `peak_memory_mb`, and on real backends the last float bits of a batched
forward pass).

The methods run side by side on each problem with the same derived seed, so per-problem
latency ratios compare the same work on the same machine state. In process, `run_stream`
keeps P programs (`methods.program`: any method) in flight across all batched units (the next
problem joins the running batch as soon as one finishes, and each row is written when its
program finishes): K MH chains, Power-SMC systems or rollouts share every forward pass. A
batched row's `seconds` is its own program's time from admission to answer, spent beside up
to P - 1 others.

Results with weighted particles (Power-SMC, best-of-N) are graded twice: the drawn answer (the
paper's output: `answer`, `correct`) and the weighted vote over all particles, answers pooled
by the grader's extraction and normalisation (`voted_answer`, `voted_correct`, ...;
`methods.selection.weighted_vote`), so one run grades both.
"""

from __future__ import annotations

import resource
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import torch

from powersmc.backends.protocol import LanguageModel
from powersmc.eval.grading import answer_key, grade
from powersmc.eval.problem import Problem
from powersmc.eval.prompts import render
from powersmc.methods.registry import method_program
from powersmc.methods.selection import normalized, weighted_vote
from powersmc.runtime.api import run_method
from powersmc.runtime.scheduler import Handle, Scheduler

Key = tuple[str, str, int]  # (problem id, method, seed): one result row


@dataclass(frozen=True)
class Settings:
    """What every unit of a run shares: the power exponent, the answer length, the methods'
    options (`methods.registry.run_method`) and, under `--budget`, each method's own knob
    (`eval.budget`), which overrides them for that method."""

    alpha: float
    max_new_tokens: int
    options: dict[str, Any] = field(default_factory=dict)
    knobs: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """One method on one problem for one seed, or (`batched`) on several problems in one
    batch; `prompts` are the problems' rendered prompts."""

    method: str
    seed: int
    problems: tuple[Problem, ...]
    prompts: tuple[str, ...]
    batched: bool = False

    @property
    def keys(self) -> list[Key]:
        return [(p.id, self.method, self.seed) for p in self.problems]


def derived_seed(seed: int, problem_id: str) -> int:
    """The seed of one (problem, seed) cell, shared by all methods (common random numbers)."""
    return zlib.crc32(f"{seed}:{problem_id}".encode()) & 0x7FFFFFFF


def plan(problems: list[Problem], methods: list[str], seeds: list[int], template: str,
         batch_prompts: int, done: Container[Key]) -> list[Unit]:
    """The units still to run, in the order a single process runs them: problems in chunks of
    `batch_prompts`, each chunk's seeds in turn; with `batch_prompts` > 1 one batched unit
    per method and chunk, else one unit per problem and method."""
    units: list[Unit] = []
    for first in range(0, len(problems), batch_prompts):
        chunk = problems[first : first + batch_prompts]
        prompts = {p.id: render(template, p.question) for p in chunk}
        for seed in seeds:
            if batch_prompts > 1:
                for method in methods:
                    todo = tuple(p for p in chunk if (p.id, method, seed) not in done)
                    if todo:
                        units.append(Unit(method, seed, todo,
                                          tuple(prompts[p.id] for p in todo), batched=True))
                continue
            for problem in chunk:
                for method in methods:
                    if (problem.id, method, seed) not in done:
                        units.append(Unit(method, seed, (problem,), (prompts[problem.id],)))
    return units


def run_unit(model: LanguageModel, unit: Unit, settings: Settings) -> list[dict]:
    """Run one unit on `model`; its result rows, graded."""
    if unit.batched:
        rows: list[dict] = []
        run_stream(model, [unit], settings, len(unit.problems), rows.append)
        return rows
    _reset_peak_memory(model.device)
    run_seed = derived_seed(unit.seed, unit.problems[0].id)
    start = time.perf_counter()
    res = run_method(unit.method, model, unit.prompts[0], alpha=settings.alpha,
                     max_new_tokens=settings.max_new_tokens, seed=run_seed,
                     **_options(settings, unit.problems[0], unit.method))
    wall = time.perf_counter() - start
    return [_record(model, unit.problems[0], unit.method, unit.seed, run_seed, res, wall)]


def run_stream(model: LanguageModel, units: list[Unit], settings: Settings, in_flight: int,
               write: Callable[[dict], None]) -> None:
    """The batched units' runs through one `Scheduler`, `in_flight` programs at a time: a
    problem joins the running batch as soon as another finishes, and `write` gets its graded
    row at once (so a killed run loses at most the programs in flight)."""
    _reset_peak_memory(model.device)
    todo = deque((u, p, prompt) for u in units
                 for p, prompt in zip(u.problems, u.prompts, strict=True))
    sched = Scheduler(model)
    live: dict[Handle, tuple[Unit, Problem, int]] = {}
    try:
        while todo or live:
            while todo and len(live) < in_flight:
                unit, problem, prompt = todo.popleft()
                run_seed = derived_seed(unit.seed, problem.id)
                handle = sched.start(method_program(
                    unit.method, model, prompt, alpha=settings.alpha,
                    max_new_tokens=settings.max_new_tokens, seed=run_seed,
                    **_options(settings, problem, unit.method)))
                live[handle] = (unit, problem, run_seed)
            sched.step()
            for handle in [h for h in live if h.done]:
                unit, problem, run_seed = live.pop(handle)
                res = handle.result()
                write(_record(model, problem, unit.method, unit.seed, run_seed, res,
                              res.cost.seconds))
    finally:
        sched.close()


def _options(settings: Settings, problem: Problem, method: str) -> dict[str, Any]:
    """The run's options for `method` (its budget knob included), and the grader's answer key
    for the methods that pool answers (maj, the consensus and majority selectors)."""
    return {**settings.options, **settings.knobs.get(method, {}),
            "key": lambda text: answer_key(text, problem.kind)}


def _record(model, problem, method, seed, run_seed, res, seconds) -> dict:
    g = grade(res.text, problem.answer, problem.kind)
    return {
        "problem_id": problem.id, "method": method, "seed": seed, "run_seed": run_seed,
        "reference": problem.answer, "answer": res.text, "extracted": g.extracted,
        "correct": g.correct, "correct_math_verify": g.correct_math_verify,
        "grading_error": g.error, "seconds": seconds, "generated_tokens": len(res.token_ids),
        "finished": res.finished, "token_evals": res.cost.token_evals,
        "forward_passes": res.cost.forward_passes, "prefill_tokens": res.cost.prefill_tokens,
        "peak_memory_mb": _peak_memory_mb(model.device), "meta": problem.meta,
        **(vote(res, problem) if getattr(res, "particles", None) else {}),
    }


def vote(res, problem: Problem) -> dict:
    """The weighted vote over a result's particles, graded: answers pooled by `answer_key`;
    `voted_weight` is the winning answer's share of the normalised weight (0: no particle
    has an answer, and the drawn answer stands)."""
    keys = [answer_key(p.text, problem.kind) for p in res.particles]
    v = weighted_vote(res.particles, key=lambda text: answer_key(text, problem.kind))
    text = res.text if v is None else res.particles[v].text
    share = 0.0 if v is None else sum(
        w for k, w in zip(keys, normalized(res.particles), strict=True) if k == keys[v])
    g = grade(text, problem.answer, problem.kind)
    return {"voted_answer": text, "voted_extracted": g.extracted, "voted_correct": g.correct,
            "voted_correct_math_verify": g.correct_math_verify, "voted_weight": share}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
