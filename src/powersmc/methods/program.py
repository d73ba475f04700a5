"""Programs: every method as a coroutine of the one `Scheduler` (`runtime.scheduler`).

A program is a Python generator. It yields a list of requests and is resumed, between two
scheduler steps, with their outcomes in the same order; what it returns is its result. While
it waits, the rows of its requests are rows of the running batch: they share every forward
pass with every other request of every other program (llamppl's and genlm-control's particles
as coroutines whose model calls one batcher groups; vLLM's requests as state machines stepped
by one scheduler). Two requests:

* `Continue`: `rows` independent continuations of the token ids `ids` (the prompt, then a kept
  prefix: an MH chain's, a lookahead candidate's), each drawn token by token from
  q proportional to p^(1/tau) (eq. 3), or its top-k / top-p nucleus, or greedily, until an EOS
  id or `max_tokens`. Answered with `Rows`: per row its tokens, log p and log q of each.
* `Particles` (`methods.smc`): one Power-SMC system (Algorithm 1); answered with its
  `SMCResult`.

Each request names its own generator, and a program draws from nothing else, so a seeded
program gives the same result alone or among others (bit-identical on batch-invariant models
such as `FunctionLM`). The scheduler accounts a program's cost: every token evaluation of
every request (rejected proposals and lookahead rollouts included), the prompts it prefilled,
and the forward passes it took part in.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from powersmc.errors import InputError
from powersmc.results import SampleResult


@dataclass(frozen=True, eq=False)
class Continue:
    """Ask for `rows` continuations of `ids` of at most `max_tokens` tokens each.

    tau: the proposal's temperature; top_k / top_p: draw from the nucleus of p^(1/tau) (a
    proposal only: log p stays the full model's); greedy: the argmax. keep_logp: also return
    the next-token log-probs at `ids` (`Rows.first_logp`). zeta_alphas: also record, at every
    drawn position, zeta_t(a) = log sum_v p(v | prefix)^a for each a (eq. 11; the MH and swap
    ratios of `methods.mcmc`); entropy: also record the next-token Shannon entropy there.
    These three need an engine with log-probs (not vLLM)."""

    ids: Sequence[int]
    rows: int
    max_tokens: int
    generator: torch.Generator
    tau: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    keep_logp: bool = False
    zeta_alphas: tuple[float, ...] = ()
    entropy: bool = False


@dataclass
class Rows:
    """The outcome of a `Continue`: per row the drawn ids (EOS included when drawn), log p of
    each under the model, log q under the proposal that drew it, and whether it ended in EOS;
    with `Continue.zeta_alphas` / `entropy`, per row and position zeta_t at each of them and
    the entropy (empty lists otherwise)."""

    tokens: list[list[int]]
    logp: list[list[float]]
    logq: list[list[float]]
    finished: list[bool]
    first_logp: torch.Tensor | None = field(default=None, repr=False)
    zeta: list[list[list[float]]] = field(default_factory=list, repr=False)
    entropy: list[list[float]] = field(default_factory=list, repr=False)

    def log_p(self) -> list[float]:
        """log p of each row's whole continuation."""
        return [sum(r) for r in self.logp]


# yields lists of requests (`Continue`, `smc.Particles`, a paused `System`), is sent their outcomes
Program = Generator[list[Any], list[Any], SampleResult]


def spawn(generator: torch.Generator) -> torch.Generator:
    """A generator for one request, seeded from the program's own."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    child = torch.Generator(device=generator.device)
    child.manual_seed(seed)
    return child


def check_tau(tau: float, name: str = "temperature") -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (
            math.isfinite(tau) and tau > 0):
        raise InputError(name, "a finite number > 0", tau)
    return float(tau)
