"""The FastAPI application: OpenAI-compatible routes in front of one `Batcher`.

Handlers do only cheap work (auth, body size, JSON, validation, defaults); sampling happens on
the batcher's worker thread. While a request waits, its handler polls for a client disconnect
and for its deadline, and cancels the work (dropped if still queued, discarded if already
running): a disconnect gets nothing, a passed deadline 408.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.server.batching import Batcher, WorkItem, deadline_error
from powersmc.server.body import read_json
from powersmc.server.config import ServerConfig
from powersmc.server.errors import APIError, from_input_error, from_validation_errors
from powersmc.server.execute import Executor, JobResult
from powersmc.server.jobs import resolve
from powersmc.server.responses import response_body, stream_events
from powersmc.server.schemas import ChatRequest, CompletionRequest, field_names

log = logging.getLogger("powersmc.server")
DISCONNECT_POLL_S = 0.1
_FIELDS = field_names()


def create_app(lm: LanguageModel, config: ServerConfig) -> FastAPI:
    """An app serving `lm` with `config`; its worker thread runs while the app is up."""
    batcher = Batcher(Executor(lm).run, max_batch=config.max_batch,
                      batch_wait_s=config.batch_wait_ms / 1000, max_queue=config.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="powersmc", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher, app.state.config = batcher, config
    _error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, "queued": batcher.queued(),
                "running": batcher.running, "stats": dict(batcher.stats)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, config)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": 0, "owned_by": "powersmc"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(request, CompletionRequest, config, batcher)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(request, ChatRequest, config, batcher)

    return app


async def _answer(request: Request, model_cls: type[BaseModel], config: ServerConfig,
                  batcher: Batcher) -> Response:
    _authorize(request, config)
    body = await read_json(request, config.max_body_bytes)
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(), _FIELDS) from None
    job = resolve(req, config)  # type: ignore[arg-type]
    item = batcher.submit(job)
    result = await _wait(request, item, batcher)
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if job.stream:
        return StreamingResponse(stream_events(job, result, config.model_name),
                                 media_type="text/event-stream")
    return JSONResponse(response_body(job, result, config.model_name))


async def _wait(request: Request, item: WorkItem, batcher: Batcher) -> JobResult | None:
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
                raise deadline_error(item)
            if await request.is_disconnected():
                batcher.cancel(item)
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


def _error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        err = APIError(500, f"internal error ({type(exc).__name__})", code="internal_error")
        return JSONResponse(err.body(), status_code=500)
