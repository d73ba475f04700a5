"""`powersmc serve --replicas K`: K Ray Serve replicas of the single-process server behind one
HTTP endpoint.

Two Ray Serve deployments in one application:

- `Replica` (K copies, or Ray Serve autoscaling between --min-replicas and --max-replicas):
  each loads the model once and runs the very app `create_app(lm, config)` builds for the
  single-process server (its worker, routes, checks, errors, auth, metrics), called in-process
  through ASGI with the request the ingress forwards. It reports its `/health` and `/metrics`
  to the ingress every `REPORT_S` seconds, and Ray Serve's health check asks its `/health`.
- `Ingress` (one copy, no CPU reserved): Ray Serve's HTTP proxy hands it every request. It
  answers `/health` and `/metrics` for the whole fleet from the replicas' reports (each
  replica's metrics with a `replica` label, and their sum as `replica="all"`), and forwards
  every other request, body capped at --max-body-bytes, to one replica (Ray Serve's router
  picks it). What a replica answers goes back unchanged; when no replica can answer, the
  ingress answers an OpenAI-style 503 with `Retry-After` itself:
  `replica_failed` (the replica died with the request on it), `no_replica_available` (none
  ready: all loading, dead or unhealthy, or none took the request within `assign_timeout_s`).

Shutdown (SIGTERM) drains as the single process does: the ingress stops admitting (503
`shutting_down`, /health 503 `draining`), the requests it has forwarded may finish for up to
--shutdown-timeout seconds, those still running are then cancelled (503 `shutting_down`), and
only then is the application deleted. A second SIGTERM cancels at once.

This module imports Ray only inside functions; the single-process path never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from powersmc.errors import InputError
from powersmc.server.config import ServerConfig
from powersmc.server.errors import APIError, shutting_down

log = logging.getLogger("powersmc.server")
APP_NAME = "powersmc"
REPORT_S = 1.0  # a replica reports its health and metrics this often
STALE_S = 3.0  # a replica not heard from for this long is left out of /health and /metrics
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # a local cluster's object store (requests are small)


@dataclass(frozen=True)
class Placement:
    """How many replicas, and what each reserves: `threads` CPUs (and one GPU with `gpu`).
    `replicas` is the starting count; with `max_replicas` > `min_replicas` Ray Serve
    autoscales between them on the requests each replica has queued or running."""

    replicas: int
    threads: int
    gpu: bool
    min_replicas: int
    max_replicas: int
    assign_timeout_s: float = 10.0

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas != self.min_replicas


def plan(replicas: int, *, threads: int | None, device: str, cpus: float, gpus: float,
         min_replicas: int | None = None, max_replicas: int | None = None) -> Placement:
    """Check the flags against the cluster's CPUs and GPUs: T = --threads, else CPUs // the
    most replicas; one GPU per replica on CUDA (`device` cuda, or auto on a cluster with
    GPUs)."""
    for flag, value in (("--replicas", replicas), ("--min-replicas", min_replicas),
                        ("--max-replicas", max_replicas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InputError(flag, "an integer >= 1", value)
    if device not in ("auto", "cpu", "cuda"):
        raise InputError("--device", "auto, cpu or cuda with --replicas (Ray gives each "
                         "replica its own GPU)", device)
    low = min_replicas if min_replicas is not None else replicas
    high = max_replicas if max_replicas is not None else replicas
    if not low <= replicas <= high:
        raise InputError("--replicas", f"within --min-replicas ({low}) and --max-replicas "
                         f"({high})", replicas)
    use_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    t = threads or max(1, int(cpus) // high)
    if high * t > cpus:
        raise InputError("--replicas", f"replicas x threads within the Ray cluster's {cpus:g} "
                         "CPUs (lower --replicas, --max-replicas or --threads)",
                         f"{high} x {t}")
    if use_gpu and high > gpus:
        raise InputError("--replicas", f"at most one replica per GPU of the Ray cluster "
                         f"({gpus:g} GPUs)", high)
    return Placement(replicas=replicas, threads=t, gpu=use_gpu, min_replicas=low,
                     max_replicas=high)


# ---------------------------------------------------------------- in-process ASGI calls

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


# ---------------------------------------------------------------- the replica

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


# ---------------------------------------------------------------- the ingress

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


# ---------------------------------------------------------------- start-up

def build_app(spec: Any, config: ServerConfig, placement: Placement,
              autoscaling: dict[str, Any] | None = None) -> Any:
    """The Ray Serve application: `Ingress` in front of the `Replica` deployment.
    `autoscaling`: more of Ray Serve's `autoscaling_config` (`upscale_delay_s`, default 30;
    `downscale_delay_s`, default 600; `look_back_period_s`, ...), used when autoscaling."""
    from ray import serve

    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": placement.threads,
                              "num_gpus": 1 if placement.gpu else 0},
        # the app answers 429 itself past --max-queue: let every request reach it
        "max_ongoing_requests": config.max_queue + config.max_batch + 16,
        "health_check_period_s": 2.0, "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": config.shutdown_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if placement.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": placement.min_replicas, "max_replicas": placement.max_replicas,
            "initial_replicas": placement.replicas,
            # queued + running requests per replica Ray Serve aims at: one full batch
            "target_ongoing_requests": config.max_batch} | (autoscaling or {})
    else:
        options["num_replicas"] = placement.replicas
    replica = serve.deployment(Replica, name="Replica").options(**options)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, 4 * placement.max_replicas * config.max_queue))
    return ingress.bind(replica.bind(spec, config, placement.threads), config, placement)


@contextlib.contextmanager
def replicated(spec: Any, config: ServerConfig, replicas: int, *, host: str = "127.0.0.1",
               port: int = 8000, threads: int | None = None, device: str = "auto",
               min_replicas: int | None = None, max_replicas: int | None = None,
               ray_address: str | None = None, assign_timeout_s: float = 10.0,
               ready_timeout_s: float = 600.0, autoscaling: dict[str, Any] | None = None,
               hurry: threading.Event | None = None) -> Iterator[str]:
    """Serve `spec`'s model on `replicas` Ray Serve replicas at http://host:port until the
    block ends; yields the base URL once /health is 200. Joins the Ray session this process
    has, else the cluster at `ray_address` (or $RAY_ADDRESS), else starts a local one (and
    stops it at the end). `autoscaling`: see `build_app`. When the block ends the ingress
    drains (`drain`); `hurry`, once set, cuts the drain short."""
    from ray import serve

    from powersmc.eval.ray_pool import _check_reachable, import_ray

    ray = import_ray()
    own, ingress = False, None
    if ray.is_initialized():
        if ray_address is not None:
            raise InputError("--ray-address", "unset when this process is already connected "
                             "to Ray", ray_address)
    else:
        if ray_address is not None:
            if not str(ray_address).strip():
                raise InputError("--ray-address", "a Ray cluster address (host:port)",
                                 ray_address)
            _check_reachable(ray_address)
        address = ray_address or (None if os.environ.get("RAY_ADDRESS") else "local")
        extra = {"object_store_memory": LOCAL_OBJECT_STORE_BYTES} if address == "local" else {}
        level = min(logging.WARNING, logging.getLogger().getEffectiveLevel())
        handlers = _python_signal_handlers()
        try:
            ray.init(address=address, include_dashboard=False,
                     log_to_driver=level <= logging.DEBUG, logging_level=level, **extra)
        except ConnectionError as exc:
            raise InputError("--ray-address", "the address of a running Ray cluster: "
                             f"{exc}", ray_address) from None
        own = True
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    try:
        res = ray.cluster_resources()
        placement = plan(replicas, threads=threads, device=device, cpus=res.get("CPU", 0.0),
                         gpus=res.get("GPU", 0.0), min_replicas=min_replicas,
                         max_replicas=max_replicas)
        placement = Placement(**{**placement.__dict__, "assign_timeout_s": assign_timeout_s})
        serve.start(http_options={"host": host, "port": port},
                    logging_config={"log_level": "WARNING"})
        ingress = serve.run(build_app(spec, config, placement, autoscaling), name=APP_NAME,
                            route_prefix="/", logging_config={"log_level": "WARNING"})
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_ready(url, ready_timeout_s)
        yield url
    finally:
        if ingress is not None:
            try:
                drain(ingress, config.shutdown_timeout, hurry or threading.Event())
            except Exception as exc:  # noqa: BLE001 - still delete the application
                log.warning("drain failed: %s", exc)
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if own:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def _python_signal_handlers() -> dict[int, Any]:
    """The Python handlers of SIGTERM and SIGINT now set (main thread only). `ray.init`
    replaces them (SIGTERM: `sys.exit(15)`, then its C++ failure handler, which aborts the
    process a moment later), so `replicated` puts them back after it: a drain set up by the
    caller (`serve_replicated`) then runs and the process exits 0."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: h for sig in (signal.SIGTERM, signal.SIGINT)
            if callable(h := signal.getsignal(sig))}


def drain(ingress: Any, timeout: float, hurry: threading.Event) -> None:
    """Through the ingress's handle: stop admitting, wait until the forwarded requests have
    finished, `timeout` seconds have passed or `hurry` is set, then cancel what is left."""
    left = ingress.drain.remote().result(timeout_s=30)
    log.warning("draining: new requests get 503; %d in flight get up to %g s", left, timeout)
    end = time.monotonic() + timeout
    while left and time.monotonic() < end and not hurry.wait(0.25):
        left = ingress.in_flight.remote().result(timeout_s=30)
    if left:
        log.warning("shutdown timeout: cancelling %d request(s) still in flight", left)
        ingress.abort.remote().result(timeout_s=30)
        end = time.monotonic() + 10  # their 503s go out before the app is deleted
        while ingress.in_flight.remote().result(timeout_s=30) and time.monotonic() < end:
            time.sleep(0.1)


def _wait_ready(url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"the replicas did not become ready within {timeout:g} s")


def serve_replicated(args: Any, config: ServerConfig, spec: Any) -> int:
    """`powersmc serve --replicas K`: serve until SIGTERM or SIGINT, drain (`drain`: requests
    in flight may finish for up to --shutdown-timeout seconds), delete the app, exit 0."""
    stop, hurry = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # the first drains, the second cuts it short
        signal.signal(sig, lambda *_: (hurry if stop.is_set() else stop).set())
    print(f"powersmc serve: starting {args.replicas} Ray Serve replica(s) of "
          f"{config.model_name}; each loads the model", file=sys.stderr, flush=True)
    with replicated(spec, config, args.replicas, host=args.host, port=args.port,
                    threads=args.threads, device=args.device or "auto",
                    min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                    ray_address=args.ray_address, hurry=hurry) as url:
        print(f"powersmc serve: {config.model_name} on {url}/v1 ({args.replicas} replicas, "
              f"method {config.defaults['method']}); ready", file=sys.stderr, flush=True)
        stop.wait()
        print("powersmc serve: stopping the replicas", file=sys.stderr, flush=True)
    return 0
