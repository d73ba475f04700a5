"""Operations of `powersmc serve`, in process on the toy text model: Prometheus `/metrics`,
`/health` while loading / ready / draining, request deadlines (408), and the drain that
SIGTERM triggers (called directly here; the signal itself is tested on a real `powersmc serve`
in test_server_drain.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_toys import EchoLM, free_port, health, wait_for  # noqa: E402

from powersmc import FunctionLM  # noqa: E402
from powersmc.server import ServerConfig, create_app  # noqa: E402

KEY = "sk-ops"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = dict(model_name="toy", api_key=KEY, max_particles=32, max_batch=8,
              max_queue=8, defaults={"method": "smc", "alpha": 4.0, "particles": 4,
                                     "ess_threshold": 0.5, "resampler": "systematic",
                                     "ramp_tokens": 0, "order": "standard", "max_tokens": 16,
                                     "num_blocks": 2, "mh_moves": 1, "candidates": 2,
                                     "rollouts": 2, "horizon": 4})


@contextmanager
def serving(app) -> Iterator[str]:
    """Serve `app` on a free localhost port in this process; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=20)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def toy_server(**overrides) -> Iterator[tuple[str, EchoLM, object]]:
    lm = EchoLM()
    app = create_app(lm, ServerConfig(**(CONFIG | overrides)))
    try:
        with serving(app) as url:
            yield url, lm, app
    finally:
        lm.gate.set()


def post(url: str, body: dict, path: str = "completions", timeout: float = 30):
    return httpx.post(f"{url}/v1/{path}", json=body, headers=AUTH, timeout=timeout)


def send(url: str, body: dict, out: list, timeout: float = 30) -> threading.Thread:
    def go() -> None:
        try:
            out.append(post(url, body, timeout=timeout))
        except httpx.HTTPError as exc:
            out.append(exc)
    t = threading.Thread(target=go)
    t.start()
    return t


def block_worker(url: str, lm: EchoLM, body: dict | None = None) -> tuple[threading.Thread, list]:
    """Start a request that blocks the worker (in its prefill) until `lm.gate` is set."""
    lm.gate.clear()
    out: list = []
    t = send(url, body or {"prompt": "first", "seed": 0}, out)
    wait_for(lambda: health(url)["running"] == 1)
    return t, out


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# ---- /metrics

def test_metrics_count_requests_tokens_errors_and_latency():
    with toy_server() as (url, _, _):
        assert post(url, {"prompt": "abc", "max_tokens": 8}).status_code == 200
        assert post(url, {"prompt": "abc", "alpha": 0.5}).status_code == 400
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
        m = metrics(url)
    assert value(m, "powersmc_requests_total", route="completions", status="200") == 1
    assert value(m, "powersmc_requests_total", route="completions", status="400") == 1
    assert value(m, "powersmc_request_errors_total", status="400", code="invalid_value") == 1
    assert value(m, "powersmc_request_errors_total", status="401", code="invalid_api_key") == 1
    assert value(m, "powersmc_generated_tokens_total") == 3  # "ABC"
    assert value(m, "powersmc_token_evals_total") > 0
    assert value(m, "powersmc_resamplings_total") >= 0
    assert value(m, "powersmc_request_queue_seconds_count") == 1
    assert value(m, "powersmc_request_e2e_seconds_count") == 3
    assert value(m, "powersmc_requests_running") == 0
    assert value(m, "powersmc_requests_waiting") == 0
    assert value(m, "powersmc_live_systems") == 0 and value(m, "powersmc_live_particles") == 0
    assert value(m, "powersmc_server_state", powersmc_server_state="ready") == 1
    assert value(m, "powersmc_requests_cancelled_total", reason="deadline") == 0


def test_metrics_show_running_waiting_and_live_particles():
    with toy_server() as (url, lm, _):
        blocker, _ = block_worker(url, lm, {"prompt": "first", "seed": 0, "particles": 4,
                                            "n": 2})
        out: list = []
        queued = send(url, {"prompt": "second", "seed": 1}, out)
        wait_for(lambda: health(url)["queued"] == 1)
        m = metrics(url)
        assert value(m, "powersmc_requests_running") == 1
        assert value(m, "powersmc_requests_waiting") == 1
        assert value(m, "powersmc_live_systems") == 2
        assert value(m, "powersmc_live_particles") == 8
        lm.gate.set()
        blocker.join(30)
        queued.join(30)
        assert out[0].status_code == 200
        m = metrics(url)
        assert value(m, "powersmc_live_particles") == 0
        assert value(m, "powersmc_request_queue_seconds_count") == 2


def test_two_apps_in_one_process_have_their_own_metrics():
    a = create_app(EchoLM(), ServerConfig(**CONFIG))
    b = create_app(EchoLM(), ServerConfig(**CONFIG))
    a.state.metrics.add(generated_tokens=5)
    assert b"powersmc_generated_tokens_total 5.0" in a.state.metrics.render()[0]
    assert b"powersmc_generated_tokens_total 0.0" in b.state.metrics.render()[0]


# ---- /health: loading, failed

def test_health_is_503_while_the_model_loads_then_200():
    release = threading.Event()

    def loader() -> EchoLM:
        assert release.wait(20)
        return EchoLM()

    app = create_app(None, ServerConfig(**CONFIG), loader=loader)
    with serving(app) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = post(url, {"prompt": "early"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert r.headers["retry-after"] == "1"
        assert value(metrics(url), "powersmc_server_state", powersmc_server_state="loading") == 1
        release.set()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)
        assert post(url, {"prompt": "ready"}).json()["choices"][0]["text"] == "READY"


def test_a_model_that_fails_to_load_is_reported_and_stops_the_server():
    stopped = threading.Event()

    def loader():
        raise RuntimeError("no such model")

    app = create_app(None, ServerConfig(**CONFIG), loader=loader)
    app.state.lifecycle.on_fatal = stopped.set
    with serving(app) as url:
        assert stopped.wait(10)
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert post(url, {"prompt": "x"}).json()["error"]["code"] == "model_load_failed"
    assert isinstance(app.state.lifecycle.error, RuntimeError)


# ---- deadlines

def test_a_request_past_its_deadline_while_queued_is_408_and_never_runs():
    with toy_server() as (url, lm, _):
        blocker, _ = block_worker(url, lm)
        start = time.monotonic()
        r = post(url, {"prompt": "too late", "timeout": 0.3})
        assert 0.3 <= time.monotonic() - start < 5
        assert r.status_code == 408, r.text
        err = r.json()["error"]
        assert err["code"] == "request_timeout" and err["param"] == "timeout"
        assert err["type"] == "timeout_error" and "0.3 s" in err["message"]
        assert health(url)["stats"]["cancelled_waiting"] == 1 and health(url)["queued"] == 0
        lm.gate.set()
        blocker.join(30)
        assert post(url, {"prompt": "after"}).json()["choices"][0]["text"] == "AFTER"
        assert "too late" not in lm.seen
        m = metrics(url)
        assert value(m, "powersmc_requests_cancelled_total", reason="deadline") == 1
        assert value(m, "powersmc_request_errors_total", status="408",
                     code="request_timeout") == 1


def test_a_running_request_past_its_deadline_is_408_and_its_result_discarded():
    with toy_server() as (url, lm, _):
        lm.gate.clear()
        r = post(url, {"prompt": "slow", "seed": 0, "timeout": 0.3})
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        lm.gate.set()  # the worker was inside the request's prefill: it goes on from there
        assert post(url, {"prompt": "next"}).json()["choices"][0]["text"] == "NEXT"
        stats = health(url)["stats"]
        assert stats["cancelled_running"] == 1 and stats["completed"] == 1  # left the batch


def test_the_server_request_timeout_caps_the_field():
    with toy_server(request_timeout=0.4) as (url, lm, _):
        blocker, _ = block_worker(url, lm)
        for body in ({"prompt": "x", "timeout": 100}, {"prompt": "x"}):
            start = time.monotonic()
            r = post(url, body)
            assert r.status_code == 408 and "0.4 s" in r.json()["error"]["message"]
            assert time.monotonic() - start < 5
        lm.gate.set()
        blocker.join(30)
        r = post(url, {"prompt": "fast", "timeout": 0.01 + 10})
        assert r.status_code == 200


def test_expired_items_are_dropped_by_the_worker_before_they_start():
    """The worker's own check (`WorkItem.deadline`), without the handler's: an item whose
    deadline passed while queued is answered 408 and never reaches the scheduler."""
    from powersmc.server.execute import Executor
    from powersmc.server.jobs import Job
    from powersmc.server.worker import StepWorker

    lm = FunctionLM(lambda prefix: [0.0] * 4, 4, [0])
    worker = StepWorker(lambda: Executor(lm), max_systems=4, max_queue=4)
    item = worker.submit(Job(chat=False, prompts=[[1]], n=1, method="smc", alpha=2.0,
                             max_tokens=2, seed=0, timeout=0.05))
    time.sleep(0.1)
    worker.start()
    try:
        err = item.future.exception(timeout=5)
        assert err.status == 408 and err.param == "timeout"
        assert worker.sched is not None and worker.sched.steps == 0
    finally:
        worker.stop()


@pytest.mark.parametrize("timeout", [0, -1, "5", float("1e308") * 10, True])
def test_bad_timeouts_are_400(timeout):
    import json

    with toy_server() as (url, _, _):
        raw = json.dumps({"prompt": "x", "timeout": timeout}).replace("Infinity", "1e400")
        r = httpx.post(f"{url}/v1/completions", content=raw,
                       headers=AUTH | {"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "timeout", r.text


# ---- drain (what SIGTERM does)

def test_drain_refuses_new_requests_and_lets_running_ones_finish():
    with toy_server(shutdown_timeout=30) as (url, lm, app):
        blocker, first = block_worker(url, lm)
        done = threading.Event()
        app.state.drain(then=done.set)
        r = post(url, {"prompt": "new"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and h.json()["status"] == "draining"
        assert h.json()["in_flight"] == 1
        assert not done.wait(0.3)  # the running request holds the exit
        lm.gate.set()
        blocker.join(30)
        assert first[0].status_code == 200 and first[0].json()["choices"][0]["text"] == "FIRST"
        assert done.wait(10)
        assert value(metrics(url), "powersmc_server_state", powersmc_server_state="draining") == 1


def test_drain_timeout_cancels_what_is_left_with_503():
    with toy_server(shutdown_timeout=0.3) as (url, lm, app):
        blocker, first = block_worker(url, lm)
        second: list = []
        queued = send(url, {"prompt": "queued", "seed": 2}, second)
        wait_for(lambda: health(url)["queued"] == 1)
        done = threading.Event()
        app.state.drain(then=done.set)
        assert done.wait(10)
        blocker.join(10)
        queued.join(10)
        for r in (first[0], second[0]):
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert "--shutdown-timeout" in r.json()["error"]["message"]
        assert value(metrics(url), "powersmc_requests_cancelled_total", reason="shutdown") == 2
        lm.gate.set()
        assert "queued" not in lm.seen


@pytest.mark.parametrize("args,needle", [
    (["--request-timeout", "0"], "--request-timeout"),
    (["--request-timeout", "nan"], "--request-timeout"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
])
def test_serve_rejects_bad_timeouts_before_loading_the_model(args, needle, capsys):
    from powersmc.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
