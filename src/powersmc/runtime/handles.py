"""A started program's handle, and the program in flight (its requests, outcomes and cost),
as the `Scheduler` (`runtime.scheduler`) drives it."""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import numpy as np
import torch

from powersmc.backends.engine import Draw, DrawSpec, ParticleEngine
from powersmc.backends.protocol import LanguageModel
from powersmc.methods.program import Continue, Program
from powersmc.methods.system import System
from powersmc.results import Cost, SampleResult
from powersmc.runtime.rows import RowGroup


class Cancelled(Exception):
    """The request was cancelled before it finished."""


class Handle:
    """A started program: `done`, `result()`, `cancel()`. Thread-safe to read and cancel."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._done = threading.Event()
        self._result: SampleResult | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Leave at the next step: the rows and cache are freed, no result comes."""
        self.cancelled = True

    def result(self) -> SampleResult:
        """The program's result; raises the run's error, or if not done."""
        if not self.done:
            raise RuntimeError("the request is not finished: step the scheduler")
        if self.error is not None:
            raise self.error
        assert self._result is not None
        return self._result

    def _fail(self, error: BaseException) -> None:
        if not self.done:
            self.error = error
            self._done.set()

    def _resolve(self, result: SampleResult) -> None:
        if not self.done:
            self._result = result
            self._done.set()


class Unit(Protocol):
    """What the loop needs of one request's rows (`System`, `RowGroup`)."""

    ids: list[int]
    started: float
    cost: Cost
    run: Run  # the program it belongs to

    @property
    def n(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def budget(self) -> int: ...
    def prefixes(self) -> list[list[int]] | None: ...
    def spec(self, fork_block: int) -> DrawSpec: ...
    def next_alpha(self) -> float: ...
    def weigh(self, draw: Draw, alpha: float, engine: ParticleEngine, row0: int) -> Any: ...
    def settle(self, decision: Any, engine: ParticleEngine, draw: Draw,
               row0: int) -> tuple[np.ndarray, torch.Tensor | None]: ...
    def outcome(self, model: LanguageModel) -> Any: ...


class Run:
    """A program in flight: the requests of its last yield, their outcomes, and its cost."""

    def __init__(self, program: Program, handle: Handle) -> None:
        self.program, self.handle = program, handle
        self.units: list[Unit] = []
        self.outcomes: list[Any] = []
        self.left = 0
        self.cost = Cost()
        self.started: float | None = None
        self.ended = False

    def resume(self, value: list[Any] | None, model: LanguageModel,
               eos: torch.Tensor) -> list[Unit]:
        """Run the program to its next yield; its requests as units ([] once it returned)."""
        try:
            reqs = next(self.program) if value is None else self.program.send(value)
        except StopIteration as stop:
            result: SampleResult = stop.value
            now = time.perf_counter()
            start = self.started if self.started is not None else now
            self.cost.seconds = now - start
            self.cost.queue_seconds = start - self.handle.submitted
            result.cost = self.cost
            self.handle._resolve(result)
            return []
        if not reqs:
            raise RuntimeError("a program yielded no request")
        dev = model.device
        self.units = [RowGroup(r, dev, eos) if isinstance(r, Continue) else
                      r if isinstance(r, System) else System(r, dev, eos) for r in reqs]
        for u in self.units:
            u.run = self
        self.outcomes, self.left = [None] * len(reqs), len(reqs)
        return self.units
