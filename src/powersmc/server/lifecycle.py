"""The server's life: loading -> ready -> draining (or loading -> failed), the requests in
flight, and the graceful drain run on SIGTERM.

- loading: the HTTP port is up while the model loads in a background thread; `/health` and
  every generation request answer 503 (`model_loading`) until it is ready.
- ready: requests are admitted (`admitted()` tracks each one until its handler is done).
- draining (SIGTERM): new requests get 503 (`shutting_down`); those already admitted (running
  or queued) may finish for up to --shutdown-timeout seconds; the rest are then aborted (their
  clients get 503) and the server is told to exit.
- failed: the model did not load; the server exits (the CLI reports the error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from powersmc.server.errors import APIError, shutting_down
from powersmc.server.metrics import Metrics

log = logging.getLogger("powersmc.server")
HANDLER_GRACE_S = 5.0  # after aborting, how long the handlers get to write their 503s


class Lifecycle:
    """State, in-flight requests and drain of one app (thread-safe)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.state = "loading"
        self.error: BaseException | None = None  # why the model failed to load
        self.on_fatal: Callable[[], None] | None = None  # stops the server (set by `run`)
        self._inflight: set[Any] = set()
        self._cond = threading.Condition()
        self._drain: threading.Thread | None = None
        self._hurry = threading.Event()
        self.metrics.set_state("loading")

    def _set(self, state: str) -> None:
        self.state = state
        self.metrics.set_state(state)

    # ---- loading
    def ready(self) -> None:
        """The model is loaded (only a loading server becomes ready)."""
        with self._cond:
            if self.state == "loading":
                self._set("ready")

    def load(self, loader: Callable[[], Any], on_loaded: Callable[[Any], None]) -> threading.Thread:
        """Run `loader()` in a background thread, hand its model to `on_loaded`, then be ready.
        On failure: state `failed`, the error kept in `error`, and `on_fatal()` called."""

        def run() -> None:
            try:
                model = loader()
                on_loaded(model)
            except BaseException as exc:  # noqa: BLE001 - reported, and the server exits
                log.error("the model failed to load: %s: %s", type(exc).__name__, exc)
                self.error = exc
                with self._cond:
                    self._set("failed")
                if self.on_fatal is not None:
                    self.on_fatal()
                return
            self.ready()

        thread = threading.Thread(target=run, name="powersmc-load", daemon=True)
        thread.start()
        return thread

    # ---- admission
    def _refusal(self) -> APIError:
        if self.state == "loading":
            return APIError(503, "the model is still loading; retry shortly",
                            code="model_loading")
        if self.state == "failed":
            return APIError(503, "the model failed to load", code="model_load_failed")
        return shutting_down()

    def check(self) -> None:
        """Raise the 503 a request gets unless the server is ready."""
        if self.state != "ready":
            raise self._refusal()

    @contextmanager
    def admitted(self, submit: Callable[[], Any]) -> Iterator[Any]:
        """Admit one request (503 unless ready): `submit()` gives its work item, tracked as in
        flight until the block ends. Admission and tracking are atomic with respect to a drain."""
        with self._cond:
            if self.state != "ready":
                raise self._refusal()
            item = submit()
            self._inflight.add(item)
        try:
            yield item
        finally:
            with self._cond:
                self._inflight.discard(item)
                self._cond.notify_all()

    def in_flight(self) -> int:
        with self._cond:
            return len(self._inflight)

    # ---- drain
    def drain(self, timeout: float, abort: Callable[[Any], None],
              then: Callable[[], None]) -> None:
        """Stop admitting now; in a thread, wait until nothing is in flight or `timeout`
        seconds have passed, `abort(item)` each request still in flight, then call `then()`.
        Called again while draining: stop waiting and abort at once."""
        with self._cond:
            if self._drain is not None:
                self._hurry.set()
                self._cond.notify_all()
                return
            self._set("draining")
            self._drain = threading.Thread(target=self._run_drain, args=(timeout, abort, then),
                                           name="powersmc-drain", daemon=True)
        log.warning("draining: new requests get 503; %d in flight get up to %g s",
                    self.in_flight(), timeout)
        self._drain.start()

    def _run_drain(self, timeout: float, abort: Callable[[Any], None],
                   then: Callable[[], None]) -> None:
        end = time.monotonic() + timeout
        with self._cond:
            while self._inflight and not self._hurry.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            rest = list(self._inflight)
        if rest:
            log.warning("shutdown timeout: cancelling %d request(s) still in flight", len(rest))
        for item in rest:
            abort(item)
        end = time.monotonic() + HANDLER_GRACE_S
        with self._cond:
            while self._inflight and time.monotonic() < end:
                self._cond.wait(0.1)
        then()

    def draining(self) -> bool:
        return self._drain is not None
