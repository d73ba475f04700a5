"""`powersmc serve --replicas K` in process (`server.replicas.replicated`) on a local CPU Ray
cluster with two replicas of the toy text model (`server_toys.SlowEchoLM`, 20 ms a step, so
long prompts keep requests in flight): the same answers and errors as the single-process
server, fleet /health and /metrics, and faults (a replica killed mid-request, every replica
down) driven by the `openai` client.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray_cluster import local_ray  # noqa: E402
from server_toys import EchoLM, echo_lm, free_port, live_server  # noqa: E402

from powersmc.models import ModelSpec  # noqa: E402
from powersmc.server import ServerConfig  # noqa: E402
from powersmc.server.placement import plan  # noqa: E402
from powersmc.server.replica import REPORT_S  # noqa: E402
from powersmc.server.replicas import replicated  # noqa: E402

KEY = "sk-replicas"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = dict(model_name="toy", api_key=KEY, max_particles=32, max_batch=8,
              max_queue=8, max_body_bytes=4096, max_tokens_limit=200,
              defaults={"method": "smc", "alpha": 4.0, "particles": 4, "ess_threshold": 0.5,
                        "resampler": "systematic", "ramp_tokens": 0, "order": "standard",
                        "max_tokens": 100, "num_blocks": 2, "mh_moves": 1, "candidates": 2,
                        "rollouts": 2, "horizon": 4})
DELAY_S = 0.02
REPLACE_S = 60  # a killed toy replica is replaced and answering within this (STALE_S included)
ASSIGN_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def cluster():
    with local_ray(2, object_store_memory=200 << 20):
        yield


@pytest.fixture(scope="module")
def url(cluster):
    spec = ModelSpec({"delay_s": DELAY_S}, factory=echo_lm)
    with replicated(spec, ServerConfig(**CONFIG), 2, port=free_port(), device="cpu",
                    assign_timeout_s=ASSIGN_TIMEOUT_S, ready_timeout_s=180) as base:
        wait_ready(base, 2, 60)
        yield base


@pytest.fixture(scope="module")
def single():
    with live_server(EchoLM(), **CONFIG) as base:
        yield base


def client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0,
                         timeout=kw.pop("timeout", 60), **kw)


def health(base: str) -> tuple[int, dict]:
    r = httpx.get(f"{base}/health", timeout=10)
    return r.status_code, r.json()


def wait_ready(base: str, replicas: int, timeout: float, gone: set[int] = frozenset()) -> dict:
    """Wait until `replicas` replicas, none with a pid in `gone`, report ready; their /health
    bodies by replica id."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = health(base)
        pids = {r["pid"] for r in body["replicas"].values()}
        if status == 200 and body["ready_replicas"] >= replicas and not pids & gone:
            return body["replicas"]
        if time.monotonic() > deadline:
            raise AssertionError(f"not {replicas} ready replicas in {timeout} s: {body}")
        time.sleep(0.25)


def strip(body: dict) -> dict:
    """A response body without what differs from call to call (id, time, timings)."""
    info = {k: v for k, v in body.get("powersmc", {}).items()
            if k not in ("seconds", "queue_seconds", "batch_requests", "batch_prompts")}
    return {k: v for k, v in body.items() if k not in ("id", "created")} | {"powersmc": info}


def test_plan_maps_replicas_to_threads_and_gpus():
    assert plan(2, threads=None, device="cpu", cpus=8, gpus=0).threads == 4
    p = plan(2, threads=None, device="auto", cpus=16, gpus=2, max_replicas=2, min_replicas=1)
    assert p.gpu and p.threads == 8 and p.autoscaling
    for bad in (dict(replicas=0), dict(replicas=3, max_replicas=2),
                dict(replicas=4, device="cuda", gpus=2), dict(replicas=2, threads=8),
                dict(replicas=1, device="cuda:1")):
        kw = dict(threads=None, device="cpu", cpus=8, gpus=0) | bad
        with pytest.raises(Exception, match="--"):
            plan(kw.pop("replicas"), **kw)


def test_answers_and_errors_are_those_of_the_single_process_server(url, single):
    """Same body for a seeded request (text, log_z, usage), same errors and statuses."""
    bodies = [
        ("completions", {"model": "toy", "prompt": "hello there", "seed": 5}),
        ("chat/completions", {"model": "toy", "seed": 1,
                              "messages": [{"role": "user", "content": "abc"}]}),
        ("completions", {"model": "toy", "prompt": "x", "alpha": 0.5}),
        ("completions", {"model": "toy", "prompt": "x", "particles": 33}),  # > max_particles
        ("completions", {"model": "toy", "prompt": "x", "max_tokens": 201}),  # > limit
        ("completions", {"model": "toy", "prompt": "x" * 300, "max_tokens": 10}),  # > context
        ("completions", {"model": "toy", "prompt": "x", "bogus": 1}),
        ("completions", {"model": "gpt-4o", "prompt": "x"}),
        ("completions", {"model": "toy", "prompt": "x" * 5000}),  # > max_body_bytes: 413
    ]
    for path, body in bodies:
        a = httpx.post(f"{url}/v1/{path}", json=body, headers=AUTH, timeout=60)
        b = httpx.post(f"{single}/v1/{path}", json=body, headers=AUTH, timeout=60)
        assert a.status_code == b.status_code, (body, a.text, b.text)
        assert strip(a.json()) == strip(b.json()), body
    for path, kw in (("completions", {}), ("models", {})):
        a = httpx.request("POST" if path == "completions" else "GET", f"{url}/v1/{path}",
                          json={"model": "toy", "prompt": "x"} if kw == {} else None,
                          headers={"Authorization": "Bearer nope"}, timeout=30)
        assert a.status_code == 401 and a.json()["error"]["code"] == "invalid_api_key"
    # a streamed answer is the whole answer, as from one process
    chunks = list(client(url).completions.create(model="toy", prompt="stream me", seed=2,
                                                 stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "STREAM ME"


def test_openai_client_requests_spread_over_the_replicas(url):
    """Concurrent requests, each answered with its own prompt; /health and /metrics show both
    replicas (with a `replica` label) and their sum."""
    c = client(url)
    prompts = [f"prompt number {i}" for i in range(12)]
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        out[i] = c.completions.create(model="toy", prompt=prompts[i]).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == {i: p.upper() for i, p in enumerate(prompts)}
    status, body = health(url)
    assert status == 200 and body["ready_replicas"] == 2 and len(body["replicas"]) == 2
    assert body["stats"]["completed"] == sum(r["stats"].get("completed", 0)
                                             for r in body["replicas"].values())
    time.sleep(2 * REPORT_S)  # the periodic reports carry the metrics
    text = httpx.get(f"{url}/metrics", timeout=10).text
    tokens = {s.labels["replica"]: s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "powersmc_generated_tokens_total"}
    assert set(tokens) == {*body["replicas"], "all"}
    assert tokens["all"] == sum(v for k, v in tokens.items() if k != "all") > 0
    assert sum(1 for k, v in tokens.items() if k != "all" and v > 0) == 2  # both served


def _outcome(c: openai.OpenAI, prompt: str) -> tuple:
    try:
        r = c.completions.create(model="toy", prompt=prompt)
        return ("ok", r.choices[0].text, prompt)
    except openai.APIStatusError as exc:
        return ("error", exc.status_code, exc.response.headers.get("retry-after"),
                exc.body.get("code") if isinstance(exc.body, dict) else None)
    except openai.APIError as exc:  # a connection error, a timeout: counts as a failure
        return ("broken", type(exc).__name__, str(exc))


def test_a_replica_killed_mid_request(url):
    """SIGKILL one replica while requests run on both: each request gets its own full answer
    or an OpenAI 503 with Retry-After, none hangs; the replica is replaced and answers."""
    before = wait_ready(url, 2, REPLACE_S)
    c = client(url, timeout=60)
    prompts = [f"a long request that takes a while to answer, number {i:02d}" for i in range(8)]
    results: list[tuple] = []
    threads = [threading.Thread(target=lambda p=p: results.append(_outcome(c, p)))
               for p in prompts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    victim = None
    while victim is None and time.monotonic() < deadline:  # a replica with work on it
        reps = health(url)[1]["replicas"]
        busy = [r for r in reps.values() if r["in_flight"] > 0]
        if len(busy) == 2:
            victim = busy[0]
        time.sleep(0.05)
    assert victim is not None, "the requests did not reach both replicas"
    os.kill(victim["pid"], signal.SIGKILL)
    start = time.monotonic()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(results) == len(prompts)
    oks = [r for r in results if r[0] == "ok"]
    errors = [r for r in results if r[0] != "ok"]
    assert all(text == prompt.upper() for _, text, prompt in oks)  # never an empty answer
    assert oks and errors, results
    assert all(r[0] == "error" and r[1] == 503 and r[2] == "1" and r[3] == "replica_failed"
               for r in errors), errors
    # replaced: two ready replicas again, one of them new, and new requests answered
    after = wait_ready(url, 2, REPLACE_S, gone={victim["pid"]})
    assert set(after) != set(before)
    assert c.completions.create(model="toy", prompt="back").choices[0].text == "BACK"
    print(f"replica replaced and answering {time.monotonic() - start:.1f} s after the kill")


def test_every_replica_down_is_503_not_a_hang(url):
    reps = wait_ready(url, 2, REPLACE_S)
    for r in reps.values():
        os.kill(r["pid"], signal.SIGKILL)
    c = client(url, timeout=30)
    start = time.monotonic()
    outcome = _outcome(c, "anyone there")
    took = time.monotonic() - start
    assert outcome[0] == "error" and outcome[1] == 503 and outcome[2] == "1", outcome
    assert outcome[3] in ("no_replica_available", "replica_failed")
    assert took < ASSIGN_TIMEOUT_S + 5
    wait_ready(url, 1, REPLACE_S, gone={r["pid"] for r in reps.values()})
    assert c.completions.create(model="toy", prompt="again").choices[0].text == "AGAIN"
