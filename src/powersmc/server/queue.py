"""The bounded queue of requests that feeds the one worker thread (`worker.StepWorker`).

HTTP handlers only `submit` work items and wait on their futures; the worker alone calls the
model (forward passes are not thread-safe).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from powersmc.server.errors import APIError, shutting_down
from powersmc.server.jobs import Job

if TYPE_CHECKING:
    from powersmc.server.metrics import Metrics

@dataclass(eq=False)
class WorkItem:
    """A job waiting for (or in) the batch; `future` gets its outcome.

    `deadline` (a `time.monotonic()` instant, or None) is when the request's answer stops being
    wanted (`job.timeout` after submission: its `timeout` field capped by --request-timeout).
    The HTTP handler answers 408 at that instant and cancels the item; the worker drops an
    expired item it has not started (`expired()`), and drops its requests from the scheduler
    at the next step once `cancelled or expired()`.
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
    """The bounded queue of work items and the one worker thread that drains it (`_loop`)."""

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
