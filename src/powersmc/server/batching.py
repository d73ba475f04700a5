"""The one worker thread that owns the model, and the bounded queue that feeds it.

HTTP handlers only `submit` work items and wait on their futures; the worker alone calls the
model (forward passes are not thread-safe). Batching rule: the oldest waiting item starts a
batch; items with the same `batch_key` (unseeded SMC jobs with equal alpha, particles, ESS
threshold, resampler, ramp and max_tokens) join it, oldest first, until `max_batch` particle
systems or until `batch_wait` has passed since the batch was started. Items with another key
wait for a later batch; items whose key is None (seeded or non-SMC jobs) always run alone.
The oldest item always runs next, so nothing starves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from powersmc.server.errors import APIError, shutting_down
from powersmc.server.jobs import Job

if TYPE_CHECKING:
    from powersmc.server.metrics import Metrics

log = logging.getLogger("powersmc.server")

RunBatch = Callable[[list[Job]], list[Any]]


@dataclass(eq=False)
class WorkItem:
    """A job waiting for (or in) a batch; `future` gets its outcome.

    `deadline` (a `time.monotonic()` instant, or None) is when the request's answer stops being
    wanted (`job.timeout` after submission: its `timeout` field capped by --request-timeout).
    The HTTP handler answers 408 at that instant and cancels the item; the worker drops an
    expired item it has not started (`expired()`), and a per-step scheduler should drop its
    systems at the next step once `cancelled or expired()`.
    """

    job: Job
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    deadline: float | None = None

    def __post_init__(self) -> None:
        timeout = getattr(self.job, "timeout", None)
        if self.deadline is None and timeout is not None:
            self.deadline = self.enqueued + timeout

    def expired(self, now: float | None = None) -> bool:
        """Whether the deadline has passed."""
        return self.deadline is not None and (time.monotonic() if now is None else now) \
            >= self.deadline


def deadline_error(item: WorkItem) -> APIError:
    """The 408 a request gets when its deadline passes before its answer."""
    timeout = getattr(item.job, "timeout", None)
    within = f"{timeout:g} s" if timeout is not None else "its deadline"
    return APIError(408, f"timeout: no answer within the request's deadline ({within}: its "
                    "'timeout' field, capped by the server's --request-timeout); its work was "
                    "cancelled", param="timeout", code="request_timeout")


class RequestQueue:
    """The bounded queue of work items and the one worker thread that drains it (`_loop`),
    shared by the windowed `Batcher` and the scheduler's `worker.StepWorker`."""

    def __init__(self, *, max_queue: int, metrics: Metrics | None = None) -> None:
        self.max_queue, self.metrics = max_queue, metrics
        self._pending: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stats: Counter[str] = Counter()

    def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="powersmc-worker", daemon=True)
        self._thread.start()

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, job: Job) -> WorkItem:
        """Enqueue `job`; raises a 429 `APIError` when the queue is full (503 when closed)."""
        item = WorkItem(job)
        with self._cond:
            if self._closed:
                raise shutting_down()
            if len(self._pending) >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise APIError(429, f"the queue is full ({self.max_queue} requests waiting); "
                               "retry later", code="queue_full")
            self._pending.append(item)
            self.stats["submitted"] += 1
            self._cond.notify_all()
        return item


class Batcher(RequestQueue):
    """Bounded queue + worker thread. `run_batch(jobs)` returns one outcome per job: a result,
    or an exception for that job alone; if it raises, every job of the batch gets the error."""

    def __init__(self, run_batch: RunBatch, *, max_batch: int, batch_wait_s: float,
                 max_queue: int, metrics: Metrics | None = None) -> None:
        super().__init__(max_queue=max_queue, metrics=metrics)
        self.run_batch, self.max_batch, self.batch_wait_s = run_batch, max_batch, batch_wait_s
        self.running = 0  # items in the batch being run

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what is waiting with 503, and let the running batch end."""
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for item in pending:
            item.future.set_exception(shutting_down())
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self, item: WorkItem) -> None:
        """The client went away: drop the item if it still waits, else discard its result."""
        with self._cond:
            item.cancelled = True
            if item in self._pending:
                self._pending.remove(item)
                self.stats["cancelled_waiting"] += 1
            else:
                self.stats["discarded_running"] += 1
        item.future.cancel()

    def _take_batch(self) -> list[WorkItem] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._drop_expired()
            if not self._pending:
                return []
            first = self._pending.popleft()
            batch, size, key = [first], first.job.systems, first.job.batch_key
            deadline = time.monotonic() + self.batch_wait_s
            while key is not None and size < self.max_batch and not self._closed:
                for item in list(self._pending):
                    fits = size + item.job.systems <= self.max_batch
                    if item.job.batch_key == key and fits and not item.expired():
                        self._pending.remove(item)
                        batch.append(item)
                        size += item.job.systems
                left = deadline - time.monotonic()
                if size >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            self.running = len(batch)
            return batch

    def _drop_expired(self) -> None:
        """Fail the waiting items whose deadline passed (408) instead of starting them."""
        now = time.monotonic()
        for item in [i for i in self._pending if i.expired(now)]:
            self._pending.remove(item)
            self.stats["expired_waiting"] += 1
            try:
                item.future.set_exception(deadline_error(item))
            except InvalidStateError:
                pass

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            if not batch:
                continue
            start = time.monotonic()
            if self.metrics is not None:
                for item in batch:
                    self.metrics.request_started(start - item.enqueued)
            try:
                outcomes = self.run_batch([item.job for item in batch])
            except Exception as exc:  # one failed batch must not stop the server
                log.exception("batch of %d request(s) failed", len(batch))
                self.stats["failed_batches"] += 1
                outcomes = [exc] * len(batch)
            self.stats["batches"] += 1
            self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(batch))
            for item, outcome in zip(batch, outcomes, strict=True):
                self._deliver(item, outcome, start)
            with self._cond:
                self.running = 0

    def _deliver(self, item: WorkItem, outcome: Any, start: float) -> None:
        if item.cancelled:
            return
        if hasattr(outcome, "info"):
            outcome.info["queue_seconds"] = start - item.enqueued
        try:  # the client may cancel between the check above and here
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
                self.stats["completed"] += 1
        except InvalidStateError:
            pass
