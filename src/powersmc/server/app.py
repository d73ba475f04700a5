"""The FastAPI application: OpenAI-compatible routes in front of one worker.

Handlers do only cheap work (auth, body size, JSON, validation, defaults); sampling happens on
the worker thread, `worker.StepWorker`, which steps one `Scheduler`: every request, of every
method, joins the running batch at the next token. While a request waits, its handler polls
for a client disconnect and for its deadline, and cancels the work (its rows leave the batch
at the next step): a disconnect gets nothing, a passed deadline 408.

Operations: `GET /health` (200 when ready, 503 while the model loads, after it failed to load,
or while draining), `GET /metrics` (Prometheus text, see `metrics.py`), and `drain` on the
app's state (SIGTERM, see `lifecycle.py` and `run.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import InvalidStateError
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.server.body import read_json
from powersmc.server.config import ServerConfig
from powersmc.server.errors import (
    APIError,
    from_input_error,
    from_validation_errors,
    shutting_down,
)
from powersmc.server.execute import Executor, JobResult
from powersmc.server.jobs import resolve
from powersmc.server.lifecycle import Lifecycle
from powersmc.server.metrics import Metrics, MetricsMiddleware
from powersmc.server.queue import WorkItem, deadline_error
from powersmc.server.responses import response_body, stream_events
from powersmc.server.schemas import ChatRequest, CompletionRequest, field_names
from powersmc.server.worker import StepWorker

log = logging.getLogger("powersmc.server")
DISCONNECT_POLL_S = 0.1
_FIELDS = field_names()
_ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}


def create_app(lm: LanguageModel | None, config: ServerConfig, *,
               loader: Callable[[], LanguageModel] | None = None) -> FastAPI:
    """An app serving `lm` with `config`; its worker thread runs while the app is up.

    With `loader` (and `lm` None) the model is loaded in a background thread when the app
    starts: the port answers meanwhile, `/health` and generation requests with 503."""
    if (lm is None) == (loader is None):
        raise ValueError("create_app: give a model or a loader, not both")
    metrics = Metrics()
    lifecycle = Lifecycle(metrics)
    executor: list[Executor] = [Executor(lm)] if lm is not None else []
    batcher = StepWorker(lambda: executor[0], max_systems=config.max_batch,
                         max_queue=config.max_queue, metrics=metrics)
    metrics.track_requests(running=lambda: batcher.running, waiting=batcher.queued)

    def loaded(model: LanguageModel) -> None:
        executor.append(Executor(model))
        batcher.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is None:
            batcher.start()
            lifecycle.ready()
        else:
            lifecycle.load(loader, loaded)
        yield
        # the worker ends after its current step (one token); the process must not exit
        # while that step is inside the model's C code
        batcher.stop()

    app = FastAPI(title="powersmc", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=_ROUTES)

    def abort(item: WorkItem) -> None:
        """Drain timeout: the request gets 503 and its work is cancelled."""
        try:
            item.future.set_exception(shutting_down(config.shutdown_timeout))
        except InvalidStateError:  # answered (or given up) meanwhile
            return
        batcher.cancel(item)
        metrics.request_cancelled("shutdown")

    def drain(then: Callable[[], None]) -> None:
        """SIGTERM: stop admitting (503), let admitted requests finish for up to
        --shutdown-timeout seconds, cancel the rest (503), then call `then()` (exit)."""
        lifecycle.drain(config.shutdown_timeout, abort, then)

    app.state.batcher, app.state.config = batcher, config
    app.state.metrics, app.state.lifecycle, app.state.drain = metrics, lifecycle, drain
    _error_handlers(app, metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = lifecycle.state == "ready"
        body = {"status": "ok" if ready else lifecycle.state, "model": config.model_name,
                "queued": batcher.queued(), "running": batcher.running,
                "in_flight": lifecycle.in_flight(), "stats": dict(batcher.stats)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, headers={"Content-Type": content_type})

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, config)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": 0, "owned_by": "powersmc"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(request, CompletionRequest, app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(request, ChatRequest, app)

    return app


async def _answer(request: Request, model_cls: type[BaseModel], app: FastAPI) -> Response:
    config: ServerConfig = app.state.config
    batcher: StepWorker = app.state.batcher
    lifecycle: Lifecycle = app.state.lifecycle
    _authorize(request, config)
    lifecycle.check()  # refused before reading the body (and again when admitted)
    body = await read_json(request, config.max_body_bytes)
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(), _FIELDS) from None
    job = resolve(req, config)  # type: ignore[arg-type]
    with lifecycle.admitted(lambda: batcher.submit(job)) as item:
        result = await _wait(request, item, batcher, app.state.metrics)
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if job.stream:
        return StreamingResponse(stream_events(job, result, config.model_name),
                                 media_type="text/event-stream")
    return JSONResponse(response_body(job, result, config.model_name))


async def _wait(request: Request, item: WorkItem, batcher: StepWorker,
                metrics: Metrics) -> JobResult | None:
    """The job's result; None if the client disconnected first, a 408 `APIError` once its
    deadline passes (in both cases the work is cancelled)."""
    fut = asyncio.wrap_future(item.future)
    try:
        while not fut.done():
            wait_s = DISCONNECT_POLL_S
            if item.deadline is not None:
                wait_s = max(0.0, min(wait_s, item.deadline - time.monotonic()))
            await asyncio.wait({fut}, timeout=wait_s)
            if fut.done():
                break
            if item.expired():
                batcher.cancel(item)
                metrics.request_cancelled("deadline")
                raise deadline_error(item)
            if await request.is_disconnected():
                batcher.cancel(item)
                metrics.request_cancelled("disconnect")
                return None
        return fut.result()
    except asyncio.CancelledError:
        batcher.cancel(item)
        raise
    except (APIError, asyncio.InvalidStateError):
        raise
    except InputError as exc:
        raise from_input_error(exc) from None
    except Exception as exc:
        raise APIError(500, f"sampling failed for the batch this request ran in "
                       f"({type(exc).__name__}: {exc}); the server goes on serving",
                       code="batch_failed") from exc


def _authorize(request: Request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             config.api_key.encode()):
        raise APIError(401, "Authorization: a valid 'Bearer <api key>' header is required",
                       param="Authorization", code="invalid_api_key")


def _error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves as an OpenAI error object (and is counted by status and code)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.error(exc.status, exc.code)
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code="not_found" if exc.status_code == 404 else None)
        metrics.error(err.status, err.code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        metrics.error(500, "internal_error")
        err = APIError(500, f"internal error ({type(exc).__name__})", code="internal_error")
        return JSONResponse(err.body(), status_code=500)
