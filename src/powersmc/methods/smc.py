"""Power-SMC's request and program: one system's validated settings (`Options`), the request
for a system (`Particles`), and `smc_program`, which runs `rounds` systems on one prompt and
selects the answer. The systems themselves run in `methods.system` (Algorithm 1), stepped by
the one `Scheduler`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import check_alpha, check_positive_int, encode_prompt, make_generator
from powersmc.methods.options import check_all
from powersmc.methods.program import Program
from powersmc.methods.selection import AnswerKey, check_select, finish
from powersmc.proposals import Proposal, check_truncation
from powersmc.resampling import get_resampler
from powersmc.schedules import Schedule, make_schedule


@dataclass
class Options:
    """One system's validated settings (see `smc_sample_many` for their meaning)."""

    alpha: float
    n: int
    kappa: float
    resample: Any
    schedule: Schedule
    T: int
    adapted: bool
    align: int | str
    tau: float | None
    proposal: Proposal | None
    top_k: int | None
    top_p: float | None

    @classmethod
    def check(cls, *, alpha: float = 4.0, particles: int = 16, ess_threshold: float = 0.5,
              resampler: str = "systematic", ramp_tokens: int = 0,
              alpha_schedule: Schedule | Sequence[float] | None = None,
              max_new_tokens: int = 512, tau: float | None = None,
              proposal: Proposal | None = None, top_k: int | None = None,
              top_p: float | None = None, order: str = "standard",
              resample_align: int | str = "block") -> Options:
        alpha = check_alpha(alpha)
        v = check_all(dict(particles=particles, ess_threshold=ess_threshold,
                           resampler=resampler, ramp_tokens=ramp_tokens, order=order,
                           resample_align=resample_align), only=_DECLARED)
        adapted = v["order"] == "adapted"
        if adapted and (tau is not None or proposal is not None):
            raise InputError("order", "'standard' when tau or proposal is set (the adapted order "
                             "needs the default proposal, whose weight depends on the prefix "
                             "only)", order)
        check_truncation(top_k, top_p)
        return cls(alpha=alpha, n=v["particles"], kappa=v["ess_threshold"],
                   resample=get_resampler(v["resampler"]),
                   schedule=make_schedule(alpha, v["ramp_tokens"], alpha_schedule),
                   T=check_positive_int("max_new_tokens", max_new_tokens), adapted=adapted,
                   align=v["resample_align"], tau=tau, proposal=proposal, top_k=top_k,
                   top_p=top_p)


_DECLARED = ("particles", "ess_threshold", "resampler", "ramp_tokens", "order", "resample_align")
"""The options of `Options.check` that `methods.options` declares (and checks)."""


@dataclass(frozen=True, eq=False)
class Particles:
    """A program's request for one Power-SMC system of `options` on `ids`, drawn from
    `generator` (answered with its `SMCResult`). pause: the system stops after every
    resampling that is not its last step and answers with itself, paused (`System.paused`),
    so that the program can move its particles (`System.move`) and yield it to resume."""

    ids: Sequence[int]
    options: Options
    generator: torch.Generator
    seed: int
    pause: bool = False





def smc_program(model: LanguageModel, prompt: Prompt, *, seed: int | None = None,
                rounds: int = 1, select: str = "sample", key: AnswerKey | None = None,
                **options: Any) -> Program:
    """Power-SMC as a program: `rounds` independent systems on `prompt`, combined by their
    evidence and selected (`methods.selection.finish`). Round r > 0 is seeded
    `system_seed(seed, r + 1)`; one round draws from the request's own generator, so
    `smc_sample` keeps its seed's stream. Bad options raise `InputError` before the first
    yield (the scheduler starts a program at once)."""
    opts = Options.check(**options)
    check_positive_int("rounds", rounds)
    check_select(select)
    ids = encode_prompt(model, prompt, opts.T)
    gen, seed = make_generator(seed, model.device)
    reqs: list[Particles] = []
    for r in range(rounds):
        g, s = (gen, seed) if rounds == 1 else make_generator(system_seed(seed, r + 1),
                                                             model.device)
        reqs.append(Particles(ids, opts, g, s))
    results = yield reqs
    return finish(results, rounds, select, key, gen)[0]


def system_seed(seed: int, k: int) -> int:
    """The seed of the k-th system of a call seeded with `seed`: `seed` itself for k = 0 (so
    `smc_sample` keeps its seed's stream), independent streams for the others."""
    return seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(
        2, dtype=np.uint32).view(np.uint64)[0] >> 1)
