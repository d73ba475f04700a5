"""The `Ingress` deployment of `powersmc serve --replicas K` (`server.replicas`): the one HTTP
entry in front of the replicas (`server.replica`).

Ray Serve's HTTP proxy hands the ingress every request; it runs with no CPU reserved. It
answers `/health` and `/metrics` for the whole fleet from the replicas' reports (each
replica's metrics with a `replica` label, and their sum as `replica="all"`; a replica not
heard from for `STALE_S` seconds is left out), and forwards every other request, body capped
at --max-body-bytes, to one replica (Ray Serve's router picks it). What a replica answers
goes back unchanged; when no replica can answer, the ingress answers an OpenAI-style 503 with
`Retry-After` itself: `replica_failed` (the replica died with the request on it),
`no_replica_available` (none ready: all loading, dead or unhealthy, or none took the request
within `assign_timeout_s`). While it drains (`drain`, `abort`) it admits nothing new.

This module imports Ray only inside functions; the single-process path never imports it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from powersmc.server.config import ServerConfig
from powersmc.server.errors import APIError, shutting_down
from powersmc.server.placement import Placement

log = logging.getLogger("powersmc.server")
STALE_S = 3.0  # a replica not heard from for this long is left out of /health and /metrics


@dataclass
class _Report:
    at: float
    data: dict[str, Any]


class Ingress:
    """The one HTTP entry: fleet /health and /metrics, every other route forwarded to a
    replica (the body of the `Ingress` deployment)."""

    def __init__(self, replicas: Any, config: ServerConfig, placement: Placement) -> None:
        from powersmc.server.fleet import FleetMetrics

        self.replicas, self.config, self.placement = replicas, config, placement
        self.reports: dict[str, _Report] = {}
        self.fleet = FleetMetrics()
        self.draining = self.aborting = False
        self.forwarded: set[Any] = set()  # the replicas' responses still awaited

    async def drain(self) -> int:
        """Stop admitting (new requests: 503 `shutting_down`); the number still in flight."""
        self.draining = True
        return len(self.forwarded)

    async def in_flight(self) -> int:
        return len(self.forwarded)

    async def abort(self) -> int:
        """Cancel every forwarded request still running (each answered 503); how many."""
        self.draining = self.aborting = True
        for response in list(self.forwarded):
            response.cancel()
        return len(self.forwarded)

    async def report(self, data: dict[str, Any]) -> None:
        """A replica's report (periodic, or with an answer: then without metrics)."""
        now = time.monotonic()
        last = self.reports.get(data["replica"])
        if last is not None:
            if data["seq"] < last.data["seq"]:  # overtaken by a newer one
                return
            data = {"metrics": last.data.get("metrics", b"")} | data
        self.reports[data["replica"]] = _Report(now, data)
        for rid in [r for r, rep in self.reports.items() if now - rep.at > 12 * STALE_S]:
            del self.reports[rid]

    def fresh(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {rid: rep.data for rid, rep in sorted(self.reports.items())
                if now - rep.at <= STALE_S}

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        from powersmc.server.fleet import fleet_health, fleet_metrics

        path, method = request.url.path, request.method
        if path == "/health" and method == "GET":
            body, ready = fleet_health(self.fresh(), self.config.model_name)
            if self.draining:
                body["status"] = "draining"
            return JSONResponse(body, status_code=200 if ready and not self.draining else 503)
        if path == "/metrics" and method == "GET":
            data, content_type = fleet_metrics(self.fresh(), self.fleet)
            return Response(data, headers={"Content-Type": content_type})
        try:
            if self.draining:
                raise shutting_down()
            answer = await self._forward(request)
        except APIError as exc:
            self.fleet.error(exc.status, exc.code)
            headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
            return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
        if answer is None:  # the client left
            return Response(status_code=499)
        await self.report(answer["report"])
        response = Response(answer["body"], status_code=answer["status"])
        response.raw_headers = [(bytes(k), bytes(v)) for k, v in answer["headers"]]
        return response

    async def _forward(self, request: Any) -> dict[str, Any] | None:
        import ray
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        if not any(r["status"] == 200 for r in self.fresh().values()):
            raise _unavailable("no replica is ready (loading, restarting or unhealthy)")
        limit, body, size = self.config.max_body_bytes, bytearray(), 0
        async for chunk in request.stream():  # the replica answers 413 beyond the limit
            size += len(chunk)
            body += chunk
            if size > limit:
                break
        req = {"method": request.method, "path": request.url.path,
               "query": request.url.query, "headers": list(request.headers.raw),
               "body": bytes(body)}
        response = self.replicas.handle.remote(req)
        self.forwarded.add(response)
        try:
            assigned = asyncio.ensure_future(response._to_object_ref())
            done, _ = await asyncio.wait({assigned}, timeout=self.placement.assign_timeout_s)
            if not done:
                assigned.cancel()
                response.cancel()
                raise _unavailable(f"no replica took the request within "
                                   f"{self.placement.assign_timeout_s:g} s")
            assigned.result()
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except (RequestCancelledError, ray.exceptions.TaskCancelledError):
            if self.aborting:
                raise shutting_down(self.config.shutdown_timeout) from None
            return None
        except BackPressureError:
            raise APIError(429, "every replica's queue is full; retry shortly",
                           code="too_many_requests") from None
        except ray.exceptions.RayTaskError as exc:
            log.error("replica raised: %s", exc)
            raise APIError(500, f"internal error in a replica ({type(exc.cause).__name__})",
                           code="internal_error") from None
        except ray.exceptions.RayError as exc:  # the replica died, or is unreachable
            raise APIError(503, "the replica serving this request stopped before answering "
                           f"({type(exc).__name__}); it is being replaced: retry",
                           code="replica_failed") from None
        finally:
            self.forwarded.discard(response)


def _unavailable(why: str) -> APIError:
    return APIError(503, f"{why}; retry shortly", code="no_replica_available")
