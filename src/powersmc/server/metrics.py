"""Prometheus metrics of one server (`GET /metrics`, text format), on the app's own registry.

Every metric lives in a `CollectorRegistry` owned by the `Metrics` object (never the global
default one), so several apps in one process (the tests) do not clash. The API is explicit:
whoever knows a figure calls one method; nothing is scraped from private state.

Who calls what:

- the HTTP layer (`app.py`): `request_finished` for every answered generation request (status,
  end-to-end seconds), `error` for every error response (status, code), `request_cancelled`
  when a request is given up (client disconnect, deadline, shutdown), `set_state` on
  loading -> ready -> draining;
- the worker: `request_started(queue_s)` when a request leaves the queue and its work begins;
  `set_requests(running=, waiting=)` when those counts change (or `track_requests` with two
  callables read at scrape time); `set_live(systems=, particles=)` and `set_kv_cache` with the
  batch's live particle systems, particles and KV cache in use, at each step (today's windowed
  batcher sets them at the start and end of each batch, see `instrument`);
  `add(generated_tokens=, token_evals=, resamplings=)` as work is done.

Metric names (all prefixed `powersmc_`):

    requests_running, requests_waiting              gauges
    live_systems, live_particles                    gauges (particle systems / particles in
                                                     the running batch)
    kv_cache_in_use                                 gauge (backend units: KV cells on
                                                     llama.cpp, cache blocks on vLLM, cached
                                                     token rows on Transformers; 0 if unknown)
    generated_tokens_total                          counter (completion tokens answered)
    token_evals_total                               counter (token evaluations, every row)
    resamplings_total                               counter (resampling steps, all systems)
    request_queue_seconds                           histogram (submit -> work starts)
    request_e2e_seconds                             histogram (request in -> response sent)
    requests_total{route,status}                    counter (answered generation requests)
    request_errors_total{status,code}               counter (error responses, every route)
    requests_cancelled_total{reason}                counter (disconnect, deadline, shutdown)
    server_state{powersmc_server_state=...}         enum (loading, ready, draining, failed)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
)

STATES = ["loading", "ready", "draining", "failed"]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120,
                   300, 600, 1800)
CANCEL_REASONS = ("disconnect", "deadline", "shutdown")


class Metrics:
    """The server's metrics on their own registry (see the module docstring for names)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, "powersmc_"
        self.requests_running = Gauge(p + "requests_running",
                                      "Requests whose work is running", registry=r)
        self.requests_waiting = Gauge(p + "requests_waiting",
                                      "Requests waiting in the queue", registry=r)
        self.live_systems = Gauge(p + "live_systems",
                                  "Particle systems (answers being drawn) in the running batch",
                                  registry=r)
        self.live_particles = Gauge(p + "live_particles",
                                    "Particles (model rows) in the running batch", registry=r)
        self.kv_cache_in_use = Gauge(
            p + "kv_cache_in_use", "KV cache in use, in the backend's unit (llama.cpp: cells; "
            "vLLM: blocks; Transformers: cached token rows); 0 when unknown", registry=r)
        self.generated_tokens = Counter(p + "generated_tokens",
                                        "Completion tokens of the answers drawn", registry=r)
        self.token_evals = Counter(p + "token_evals",
                                   "Token evaluations by the model (every particle row)",
                                   registry=r)
        self.resamplings = Counter(p + "resamplings",
                                   "Resampling steps, summed over particle systems", registry=r)
        self.queue_seconds = Histogram(p + "request_queue_seconds",
                                       "Time from submission to the start of a request's work",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_seconds = Histogram(p + "request_e2e_seconds",
                                     "Time from a generation request's arrival to its last "
                                     "response byte", buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(p + "requests", "Answered generation requests",
                                ["route", "status"], registry=r)
        self.errors = Counter(p + "request_errors", "Error responses by status and code",
                              ["status", "code"], registry=r)
        self.cancelled = Counter(p + "requests_cancelled",
                                 "Requests given up before their answer: the client left "
                                 "(disconnect), their deadline passed (deadline), or the "
                                 "server stopped (shutdown)", ["reason"], registry=r)
        for reason in CANCEL_REASONS:
            self.cancelled.labels(reason)
        self.state = Enum(p + "server_state", "Server state", states=STATES, registry=r)
        self.state.state("loading")

    # ---- HTTP layer
    def set_state(self, state: str) -> None:
        """loading (model not ready) -> ready -> draining (SIGTERM); or loading -> failed."""
        self.state.state(state)

    def request_finished(self, route: str, status: int, e2e_s: float) -> None:
        """A generation request was answered (any status) `e2e_s` seconds after it came in."""
        self.requests.labels(route, str(status)).inc()
        self.e2e_seconds.observe(e2e_s)

    def error(self, status: int, code: str | None) -> None:
        """An error response (4xx / 5xx) with its OpenAI error code."""
        self.errors.labels(str(status), code or "none").inc()

    def request_cancelled(self, reason: str) -> None:
        """A request was given up: 'disconnect', 'deadline' or 'shutdown'."""
        self.cancelled.labels(reason).inc()

    # ---- worker
    def request_started(self, queue_s: float) -> None:
        """A request left the queue; its work starts now, `queue_s` seconds after submission."""
        self.queue_seconds.observe(max(0.0, queue_s))

    def set_requests(self, *, running: int | None = None, waiting: int | None = None) -> None:
        if running is not None:
            self.requests_running.set(running)
        if waiting is not None:
            self.requests_waiting.set(waiting)

    def track_requests(self, *, running: Callable[[], float],
                       waiting: Callable[[], float]) -> None:
        """Read the running / waiting counts from these callables at each scrape instead."""
        self.requests_running.set_function(running)
        self.requests_waiting.set_function(waiting)

    def set_live(self, *, systems: int, particles: int) -> None:
        """Particle systems and particles live in the running batch (0, 0 when idle)."""
        self.live_systems.set(systems)
        self.live_particles.set(particles)

    def set_kv_cache(self, in_use: int) -> None:
        self.kv_cache_in_use.set(in_use)

    def add(self, *, generated_tokens: int = 0, token_evals: int = 0,
            resamplings: int = 0) -> None:
        """Work done: tokens answered, token evaluations, resampling steps."""
        if generated_tokens:
            self.generated_tokens.inc(generated_tokens)
        if token_evals:
            self.token_evals.inc(token_evals)
        if resamplings:
            self.resamplings.inc(resamplings)

    # ---- exposition
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware timing the generation routes (`routes`: path -> route label): every
    request on them is counted by status and its end-to-end time observed, whether it was
    answered, failed (500) or cut short."""

    def __init__(self, app: Any, metrics: Metrics, routes: dict[str, str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500  # an exception that escapes is answered 500

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.request_finished(route, status, time.monotonic() - start)
