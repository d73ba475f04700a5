"""The worker thread on a `Scheduler`: every request, of every method, joins the running batch
at the next token, and abandoned work leaves it at the next token.

HTTP handlers `submit` work items and wait on their futures; this thread alone calls the model.
Each loop: hand every newly submitted request to the scheduler as programs
(`server.systems`: each with its own settings and generator; a seeded request's programs are
seeded as `smc_sample_many` seeds its prompts, `scheduler.system_seed`, so it reproduces, and
equals the library's answer, whatever shares the batch, up to the last float bits of a
batched forward on real backends), cancel the programs of requests whose client went away,
whose deadline passed or that a shutdown gave up, step the scheduler once (one token for every
live row of every request: Power-SMC particles, MH proposals, lookahead rollouts, decoded
samples), and answer the requests whose programs are all done. No request runs beside the
batch, so none stalls another.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from typing import TYPE_CHECKING, Any

from powersmc.errors import InputError
from powersmc.results import SMCResult
from powersmc.runtime.scheduler import Handle, Scheduler
from powersmc.server.errors import APIError, from_input_error, shutting_down
from powersmc.server.queue import RequestQueue, WorkItem, deadline_error
from powersmc.server.systems import programs

if TYPE_CHECKING:
    from powersmc.server.execute import Executor
    from powersmc.server.metrics import Metrics

log = logging.getLogger("powersmc.server")


class StepWorker(RequestQueue):
    """Bounded queue + one worker thread stepping a `Scheduler` (see the module docstring).

    max_systems: most requests' units (particle systems, continuation groups) in the batch at
    once (`--max-batch`); more wait in the scheduler, in arrival order. max_queue: most
    requests not yet started; more get 429."""

    def __init__(self, executor: Callable[[], Executor], *, max_systems: int, max_queue: int,
                 metrics: Metrics | None = None) -> None:
        super().__init__(max_queue=max_queue, metrics=metrics)
        self.executor, self.max_systems = executor, max_systems
        self.sched: Scheduler | None = None
        self._live: dict[WorkItem, tuple[list[Handle], list[list[int]], float]] = {}

    @property
    def running(self) -> int:
        """Requests whose programs are in the scheduler (in the batch or waiting for rows)."""
        return len(self._live)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work; what is waiting or running gets 503 and its programs leave."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self, item: WorkItem) -> None:
        """The answer is no longer wanted: its programs leave the batch at the next step."""
        with self._cond:
            item.cancelled = True
            if item in self._pending:
                self._pending.remove(item)
                self.stats["cancelled_waiting"] += 1
            self._cond.notify_all()
        item.future.cancel()

    # --- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        self.sched = Scheduler(self.executor().lm, max_systems=self.max_systems)
        while True:
            with self._cond:
                while not (self._closed or self._pending or self._live):
                    self._cond.wait()
                if self._closed:
                    break
                new, self._pending = list(self._pending), deque()
            for item in new:
                self._admit(item)
            self._drop_abandoned()
            if not self.sched.idle:
                try:
                    self.sched.admit()
                    self._report()
                    self.sched.step()
                except Exception:  # noqa: BLE001 - the scheduler fails its systems itself
                    log.exception("a scheduler step failed")
                self.stats["steps"] += 1
            self._deliver()
            self._report()
        self._shutdown()

    def _admit(self, item: WorkItem) -> None:
        """Hand a request's programs to the scheduler."""
        assert self.sched is not None
        if item.cancelled:  # given up between the queue and here
            self.stats["cancelled_waiting"] += 1
            return
        if item.expired():
            self._answer(item, deadline_error(item))
            return
        executor, job = self.executor(), item.job
        if self.metrics is not None:
            self.metrics.request_started(time.monotonic() - item.enqueued)
        try:
            ids = executor.encode(job)
            handles = [self.sched.start(p) for p in programs(job, executor.lm, ids)]
        except APIError as exc:
            self._answer(item, exc)
            return
        except InputError as exc:
            self._answer(item, from_input_error(exc))
            return
        except Exception as exc:  # noqa: BLE001 - this request alone fails
            log.exception("request failed")
            self._answer(item, exc)
            return
        self._live[item] = (handles, ids, time.monotonic())

    def _drop_abandoned(self) -> None:
        """Cancel the systems of requests nobody waits for: freed at the next step."""
        now = time.monotonic()
        for item, (handles, _, _) in list(self._live.items()):
            if item.cancelled or item.expired(now):
                for h in handles:
                    h.cancel()
                if not item.cancelled:
                    self._answer(item, deadline_error(item))
                self.stats["cancelled_running"] += 1
                del self._live[item]

    def _deliver(self) -> None:
        assert self.sched is not None
        for item, (handles, ids, handover) in list(self._live.items()):
            if not all(h.done for h in handles):
                continue
            del self._live[item]
            errors = [h.error for h in handles if h.error is not None]
            if errors:
                err = errors[0]
                self._answer(item, from_input_error(err) if isinstance(err, InputError)
                             else err)
                continue
            results = [h.result() for h in handles]
            out = self.executor().job_result(item.job, ids, results, len(self._live) + 1,
                                             len(self.sched.live) + len(results))
            waited = handover - item.enqueued
            out.info["queue_seconds"] = waited + max(r.cost.queue_seconds for r in results)
            if self.metrics is not None:
                self.metrics.add(generated_tokens=sum(c.completion_tokens for c in out.choices),
                                 token_evals=sum(r.cost.token_evals for r in results),
                                 resamplings=sum(len(r.resample_steps) for r in results
                                                 if isinstance(r, SMCResult)))
            self._answer(item, out)

    def _answer(self, item: WorkItem, outcome: Any) -> None:
        if item.cancelled:
            return
        try:
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
                self.stats["completed"] += 1
        except InvalidStateError:  # answered meanwhile (deadline, shutdown)
            pass

    def _report(self) -> None:
        if self.metrics is None or self.sched is None:
            return
        self.metrics.set_live(systems=len(self.sched.live), particles=self.sched.live_rows)
        cells = self.sched.cache_in_use()
        if cells is not None:
            self.metrics.set_kv_cache(cells)

    def _shutdown(self) -> None:
        err = shutting_down()
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for item in pending + list(self._live):
            self._answer(item, err)
        for handles, _, _ in self._live.values():
            for h in handles:
                h.cancel()
        self._live.clear()
        if self.sched is not None:
            self.sched.close()

