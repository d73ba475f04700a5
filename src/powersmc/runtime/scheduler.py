"""The one token loop: every method's requests share one batch that re-forms at every token.

`Scheduler` is continuous batching (Orca; vLLM's and llama.cpp's servers) for programs
(`methods.program`): each `step` admits waiting requests while rows (and cache) are free,
draws one token for every live row of every request in one engine pass, settles each request
(Algorithm 1's bookkeeping for a Power-SMC system, `methods.system`; recording for a program's
continuation rows, `runtime.rows`) with one host transfer for all of them, retires finished
requests and resumes the programs whose requests are all done, between two steps. A resumed
program's next requests join at the next step. Every request keeps its own generator and
settings, so each finished Power-SMC system is an exact, independent run of Algorithm 1 and a
seeded program gives the same result alone or in a busy batch (bit-identical on
batch-invariant models such as `FunctionLM`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from powersmc.backends.engine import Draw
from powersmc.backends.particles import particle_engine
from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import check_positive_int, eos_tensor
from powersmc.methods.program import Program
from powersmc.methods.selection import AnswerKey
from powersmc.methods.smc import smc_program
from powersmc.methods.system import System
from powersmc.runtime.handles import Cancelled, Handle, Run, Unit

__all__ = ["Cancelled", "Handle", "Scheduler"]


class Scheduler:
    """Continuous batching of every method's requests over one engine.

        sched = Scheduler(lm)                  # optional limits: max_rows, max_systems
        h = sched.submit(prompt, alpha=4.0, particles=16, max_new_tokens=256, seed=0)
        h2 = sched.start(mh_program(lm, prompt, alpha=4.0, seed=0))   # any method's program
        sched.step()                           # admit, one token for every live row, retire
        h.done; h.result(); h.cancel()
        sched.run()                            # step until every started program is done

    Each `step` admits waiting requests in arrival order while the batch has rows (`max_rows`),
    requests (`max_systems`) and engine room (`ParticleEngine.room`: on llama.cpp, contexts of
    256 rows, at most three alive) free; the first that does not fit waits, and so does
    everything after it (no starvation). One request's rows share one engine state, so a
    request has at most the engine's `max_rows` (256 on llama.cpp). On an engine that cannot
    join running batches (Transformers' dynamic cache) requests join only an empty batch.
    Not thread-safe: one thread steps; `start`, `submit` and `Handle.cancel` may come from
    others.
    """

    def __init__(self, model: LanguageModel, *, max_rows: int | None = None,
                 max_systems: int | None = None, progress: bool = False) -> None:
        self.model = model
        self.engine = particle_engine(model)
        if max_rows is not None:
            check_positive_int("max_rows", max_rows)
        if max_systems is not None:
            check_positive_int("max_systems", max_systems)
        self.max_rows = max_rows  # rows in flight
        limits = [x for x in (max_rows, self.engine.max_rows) if x is not None]
        self.request_rows = min(limits) if limits else None  # one request's rows
        self.max_systems = max_systems
        self.eos = eos_tensor(model)  # every request's EOS ids, built once
        self.waiting: deque[Unit] = deque()
        self.live: list[Unit] = []  # in row order
        self.steps = 0
        self._joined = 0  # admitted, not yet through their first step (the end of `live`)
        self._lock = threading.Lock()
        self._bar = tqdm(desc="powersmc", unit=" answer", total=0, disable=not progress,
                         leave=False)

    # --- requests -------------------------------------------------------------------------

    def start(self, program: Program) -> Handle:
        """Start `program`: it runs to its first yield now (so its bad options raise here,
        before anything runs), and its requests wait for rows."""
        handle = Handle()
        run = Run(program, handle)
        units = run.resume(None, self.model, self.eos)
        for u in units:
            if self.request_rows is not None and u.n > self.request_rows:
                name = "particles" if isinstance(u, System) else "rows"
                raise InputError(name, f"at most {self.request_rows} on this backend", u.n)
        with self._lock:
            self.waiting.extend(units)
            self._bar.total += 1
            if not units:
                self._bar.update(1)
        return handle

    def submit(self, prompt: Prompt, *, seed: int | None = None, rounds: int = 1,
               select: str = "sample", key: AnswerKey | None = None,
               **options: Any) -> Handle:
        """Start Power-SMC on `prompt` (`rounds` systems; the options of `smc_sample_many`)."""
        return self.start(smc_program(self.model, prompt, seed=seed, rounds=rounds,
                                      select=select, key=key, **options))

    @property
    def live_rows(self) -> int:
        return sum(u.rows for u in self.live)

    def cache_in_use(self) -> int | None:
        """KV cells the engine holds (None for an engine that does not count them)."""
        return self.engine.cells_in_use()

    @property
    def idle(self) -> bool:
        return not self.live and not self.waiting

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Step until every started program is done."""
        while not self.idle:
            self.step()

    def admit(self) -> None:
        """Retire cancelled requests and admit waiting ones now (`step` does this first; a
        server calls it before a step to report what the step will run)."""
        self._drop_cancelled()
        self._joined += self._admit()

    def step(self) -> None:
        """Admit waiting requests, draw one token for every live row, settle, retire."""
        self.admit()
        joined, self._joined = self._joined, 0
        if not self.live:
            return
        alphas = [u.next_alpha() for u in self.live]
        try:
            draw = self.engine.advance(alphas)
        except Exception as exc:  # the batch's pass failed: every live request fails with it
            self._fail_all(exc)
            return
        if self.engine.failed:  # a joiner whose prompt failed: that request alone fails
            first = len(self.live) - joined
            gone = {id(self.live[first + k]) for k in self.engine.failed}
            for k, error in self.engine.failed.items():
                self._finish(self.live[first + k].run, error)
            stay = [i for i, u in enumerate(self.live) if id(u) not in gone]
            self.live, alphas = [self.live[i] for i in stay], [alphas[i] for i in stay]
            if not self.live:
                return
        self.steps += 1
        for run in {id(u.run): u.run for u in self.live}.values():
            run.cost.forward_passes += 1
        live = self.live
        bounds = np.cumsum([0] + [u.rows for u in live])
        with record_function("powersmc.weights"):
            decisions = [u.weigh(_rows(draw, int(lo), int(hi)), a, self.engine, int(lo))
                         for u, a, lo, hi in zip(live, alphas, bounds[:-1], bounds[1:],
                                                 strict=True)]
        if self.engine.device.type != "cpu":
            with record_function("powersmc.sync"):  # the one host transfer of this step
                decisions = _to_host(decisions)
        index: list[np.ndarray] = []
        counts: list[int] = []
        lasts: list[torch.Tensor] = []
        keep: list[Unit] = []
        done: list[Unit] = []
        for u, d, lo in zip(live, decisions, bounds[:-1], strict=True):
            try:
                rows, last = u.settle(d, self.engine, draw, int(lo))
            except Exception as exc:  # this request alone fails (e.g. degenerate weights)
                self._finish(u.run, exc)
                rows, last = np.zeros(0, dtype=np.int64), None
            else:
                if rows.size == 0:
                    done.append(u)
            index.append(rows)
            counts.append(int(rows.size))
            lasts.append(last if last is not None else
                         draw.tokens[torch.from_numpy(rows).to(draw.tokens.device)])
            if rows.size:
                keep.append(u)
        adapted = any(isinstance(u, System) and u.o.adapted for u in live)
        with record_function("powersmc.reorder"):
            try:
                self.engine.reorder(torch.from_numpy(np.concatenate(index)).to(
                    self.engine.device), counts, torch.cat(lasts) if adapted else None)
            except Exception as exc:  # the batch's rows are lost: every live request fails
                self.live = keep
                self._fail_all(exc)
                return
        self.live = keep
        for u in done:
            self._retire(u)

    def close(self) -> None:
        """Cancel everything and release the engine."""
        with self._lock:
            for u in list(self.waiting) + self.live:
                u.run.handle._fail(InputError("request", "a running scheduler (it was closed)"))
            self.waiting.clear()
        self.live = []
        self.engine.close()
        self._bar.close()

    # --- internals ------------------------------------------------------------------------

    def _admit(self) -> int:
        """Move waiting requests into the batch while they fit; returns how many joined."""
        joined = 0
        with self._lock:
            rows, count = self.live_rows, len(self.live)
            while self.waiting:
                u = self.waiting[0]
                run = u.run
                prefixes = u.prefixes()
                longest = len(u.ids) + max((len(p) for p in prefixes or ()), default=0)
                if (self.max_rows is not None and rows + u.n > self.max_rows) or (
                        self.max_systems is not None and count >= self.max_systems) or (
                        not self.engine.room(longest, u.n, u.budget)):
                    break
                self.waiting.popleft()
                if run.handle.done:  # a sibling request failed meanwhile
                    continue
                try:
                    self.engine.admit(u.ids, u.n, u.spec(self.engine.fork_block),
                                      budget=u.budget, prefixes=prefixes)
                except Exception as exc:  # noqa: BLE001 - e.g. an option this engine refuses
                    self._finish(run, exc)
                    continue
                u.started = time.perf_counter()
                if run.started is None:
                    run.started = u.started
                self.live.append(u)
                joined += 1
                rows, count = rows + u.n, count + 1
        return joined

    def _drop_cancelled(self) -> None:
        with self._lock:
            for u in [u for u in self.waiting if u.run.handle.cancelled or u.run.handle.done]:
                self.waiting.remove(u)
                self._finish(u.run, Cancelled())
        # requests admitted but not yet stepped hold no rows yet: they leave after one step
        running = self.live[: len(self.live) - self._joined]
        gone = [u.run.handle.cancelled or u.run.handle.done for u in running]
        if not any(gone):
            return
        index, counts, row = [], [], 0
        for u, g in zip(running, gone, strict=True):
            if not g:
                index.append(np.arange(row, row + u.rows))
            else:
                self._finish(u.run, Cancelled())
            counts.append(0 if g else u.rows)
            row += u.rows
        self.engine.reorder(torch.from_numpy(np.concatenate(index + [np.zeros(0, np.int64)]))
                            .to(self.engine.device), counts)
        self.live = [u for u, g in zip(running, gone, strict=True) if not g] + self.live[
            len(running):]

    def _retire(self, u: Unit) -> None:
        """A request is done: its outcome goes to its program, resumed once all are in."""
        run = u.run
        if run.handle.done:
            return
        try:
            k = run.units.index(u)
            run.outcomes[k] = u.outcome(self.model)
            run.cost.token_evals += u.cost.token_evals
            run.cost.prefill_tokens += u.cost.prefill_tokens
            run.left -= 1
            if run.left:
                return
            units = run.resume(run.outcomes, self.model, self.eos)
        except Exception as exc:  # noqa: BLE001 - this program alone fails
            self._finish(run, exc)
            return
        if not units:
            self._finish(run, None)
            return
        with self._lock:
            self.waiting.extend(units)

    def _finish(self, run: Run, error: BaseException | None) -> None:
        """A program ends (resolved, failed or cancelled); counted once."""
        if error is not None:
            run.handle._fail(error)
        if not run.ended:
            run.ended = True
            self._bar.update(1)

    def _fail_all(self, exc: BaseException) -> None:
        for u in self.live:
            self._finish(u.run, exc)
        self.live, self._joined = [], 0
        self.engine.close()


def _rows(draw: Draw, lo: int, hi: int) -> Draw:
    return Draw(draw.tokens[lo:hi], draw.logp[lo:hi], draw.incr[lo:hi], draw.log_z[lo:hi])


def _to_host(records: list[Any]) -> list[Any]:
    """Host copies of every record's tensors (dataclasses of tensors), in one transfer."""
    flat = [getattr(r, f.name) for r in records for f in fields(r)]
    if not flat:
        return records
    host = torch.cat([t.reshape(-1).double() for t in flat]).cpu()
    out, at = [], 0
    for r in records:
        values = {}
        for f in fields(r):
            t = getattr(r, f.name)
            values[f.name] = host[at : at + t.numel()].to(t.dtype).view(t.shape)
            at += t.numel()
        out.append(type(r)(**values))
    return out
