"""`powersmc serve --replicas K`: K Ray Serve replicas of the single-process server behind one
HTTP endpoint.

Two Ray Serve deployments in one application (`build_app`), placed on the cluster by
`server.placement.plan`:

- `Replica` (`server.replica`; K copies, or Ray Serve autoscaling between --min-replicas and
  --max-replicas): each loads the model once and runs the single-process server's app.
- `Ingress` (`server.ingress`; one copy, no CPU reserved): Ray Serve's HTTP proxy hands it
  every request. It answers `/health` and `/metrics` for the whole fleet from the replicas'
  reports and forwards every other request to one replica; when no replica can answer, it
  answers an OpenAI-style 503 with `Retry-After` itself.

Shutdown (SIGTERM) drains as the single process does: the ingress stops admitting (503
`shutting_down`, /health 503 `draining`), the requests it has forwarded may finish for up to
--shutdown-timeout seconds, those still running are then cancelled (503 `shutting_down`), and
only then is the application deleted. A second SIGTERM cancels at once.

This module imports Ray only inside functions; the single-process path never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from powersmc.errors import InputError
from powersmc.server.config import ServerConfig
from powersmc.server.ingress import Ingress
from powersmc.server.placement import Placement, plan
from powersmc.server.replica import Replica

log = logging.getLogger("powersmc.server")
APP_NAME = "powersmc"
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # a local cluster's object store (requests are small)


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
