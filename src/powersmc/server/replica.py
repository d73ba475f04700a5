"""The `Replica` deployment of `powersmc serve --replicas K` (`server.replicas`): one model and
the single-process server's app around it, on a Ray Serve worker.

Each replica loads the model once and runs the very app `create_app(lm, config)` builds for
the single-process server (its worker, routes, checks, errors, auth, metrics), called
in-process through ASGI (`call_asgi`) with the request the ingress (`server.ingress`)
forwards. It reports its `/health` and `/metrics` to the ingress every `REPORT_S` seconds,
and Ray Serve's health check asks its `/health`.

This module imports Ray only inside functions; the single-process path never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from powersmc.server.config import ServerConfig

log = logging.getLogger("powersmc.server")
REPORT_S = 1.0  # a replica reports its health and metrics this often


async def call_asgi(app: Any, req: dict[str, Any]) -> dict[str, Any]:
    """Run one HTTP request through the ASGI `app` in this process: `req` has method, path,
    query (str), headers (list of (bytes, bytes)) and body (bytes); the answer has status,
    headers and the whole body. After the body, `receive` blocks: a client that leaves shows
    as this coroutine's cancellation (which the app turns into cancelled work), never as an
    `http.disconnect`."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": req["method"], "scheme": "http", "path": req["path"],
             "raw_path": req["path"].encode(), "query_string": req.get("query", "").encode(),
             "root_path": "", "headers": list(req.get("headers", [])),
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    body_sent = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.get("body", b""), "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    out: dict[str, Any] = {"status": 500, "headers": [], "body": b""}
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    out["body"] = b"".join(chunks)
    return out


class Replica:
    """One model and the single-process app around it (the body of the `Replica`
    deployment; Ray Serve builds it on a worker holding `threads` CPUs, and a GPU on CUDA)."""

    async def __init__(  # type: ignore[misc]  # Ray actors may have an async __init__
            self, spec: Any, config: ServerConfig, threads: int) -> None:
        from ray import serve

        from powersmc.server.app import create_app

        with contextlib.suppress(Exception):
            import torch

            torch.set_num_threads(threads)
        lm = await asyncio.to_thread(spec.build, threads)
        self.app = create_app(lm, config)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # the worker starts: as uvicorn would run it
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.threads, self._seq = threads, 0
        self._ingress = serve.get_deployment_handle("Ingress", app_name=ctx.app_name)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """One forwarded HTTP request, answered by the app; with it this replica's /health as
        it stands after the answer (so the fleet's /health counts it at once)."""
        answer = await call_asgi(self.app, req)
        answer["report"] = await self.report(metrics=False)
        return answer

    async def _get(self, path: str) -> dict[str, Any]:
        return await call_asgi(self.app, {"method": "GET", "path": path, "body": b""})

    async def report(self, metrics: bool = True) -> dict[str, Any]:
        """This replica's /health (status and body) and, with `metrics`, its /metrics text;
        `seq` orders the reports of one replica."""
        self._seq += 1
        out = {"replica": self.id, "seq": self._seq, "pid": os.getpid(),
               "node": socket.gethostname(), "threads": self.threads}
        health = await self._get("/health")
        out |= {"status": health["status"], "health": health["body"]}
        if metrics:
            out["metrics"] = (await self._get("/metrics"))["body"]
        return out

    async def _report_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._ingress.report.remote(await self.report()),
                                       timeout=10 * REPORT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the ingress may be (re)starting
                log.debug("replica %s: report failed: %s", self.id, exc)
            await asyncio.sleep(REPORT_S)

    async def check_health(self) -> None:
        """Ray Serve's health check: the app's own /health must be 200 (a replica whose worker
        failed, or that drains, is replaced)."""
        status = (await self._get("/health"))["status"]
        if status != 200:
            raise RuntimeError(f"replica {self.id}: /health answered {status}")

    async def __del__(self) -> None:
        self._reporter.cancel()
        with contextlib.suppress(Exception):
            await self._lifespan.__aexit__(None, None, None)
