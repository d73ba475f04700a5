"""The life of a replicated server, in process (`server.replicas.replicated`) on a local CPU
Ray cluster with the toy model (`server_toys.SlowEchoLM`):

- autoscaling (`--replicas 1 --min-replicas 1 --max-replicas 2`): under more requests than
  one replica's batch Ray Serve's autoscaler adds the second replica, and once the load stops
  it takes it away again; every request is answered with its own echo meanwhile. Ray Serve's
  defaults wait 30 s before scaling up and 600 s before scaling down, and push metrics every
  10 s; this module shortens them (`autoscaling`, two environment variables).
- the drain at the end (SIGTERM in `powersmc serve`): new requests get 503 `shutting_down`, and
  a request that outlives --shutdown-timeout is cancelled with 503 `shutting_down`, in time.
  (That a request in flight finishes and the process exits 0 is tested on the real command:
  `test_server_replicas_live.test_sigterm_drains_the_replicas_and_exits_0`.)
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from ray_cluster import local_ray  # noqa: E402
from server_toys import echo_lm, free_port  # noqa: E402

from powersmc.models import ModelSpec  # noqa: E402
from powersmc.server import ServerConfig  # noqa: E402
from powersmc.server.replicas import replicated  # noqa: E402

MAX_BATCH, CLIENTS = 4, 12
CONFIG = dict(model_name="toy", max_particles=8, max_batch=MAX_BATCH,
              max_queue=32, max_tokens_limit=200,
              defaults={"method": "smc", "alpha": 4.0, "particles": 2, "ess_threshold": 0.5,
                        "resampler": "systematic", "ramp_tokens": 0, "order": "standard",
                        "max_tokens": 100, "num_blocks": 2, "mh_moves": 1, "candidates": 2,
                        "rollouts": 2, "horizon": 4})
FAST = {"upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0}
PUSH_ENV = ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S")
SCALE_S = 90  # each change of replica count happens within this


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as mp:
        for k in PUSH_ENV:  # the local cluster's processes inherit them
            mp.setenv(k, "0.5")
        with local_ray(2, object_store_memory=200 << 20):
            yield free_port()  # Ray Serve keeps its first HTTP port while the cluster lives


@pytest.fixture
def url(cluster):
    spec = ModelSpec({"delay_s": 0.02}, factory=echo_lm)
    with replicated(spec, ServerConfig(**CONFIG), 1, port=cluster, device="cpu",
                    min_replicas=1, max_replicas=2, autoscaling=FAST,
                    ready_timeout_s=180) as base:
        yield base


def ready(base: str) -> int:
    return httpx.get(f"{base}/health", timeout=10).json()["ready_replicas"]


def wait_replicas(base: str, count: int, timeout: float) -> float:
    """Seconds until `count` replicas report ready."""
    start = time.monotonic()
    while ready(base) != count:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not {count} ready replicas within {timeout} s")
        time.sleep(0.25)
    return time.monotonic() - start


def test_replicas_follow_the_load_up_and_down(url):
    assert wait_replicas(url, 1, 30) >= 0
    stop = threading.Event()
    answers: list[tuple[str, int, str]] = []  # (prompt, status, text)

    def client(i: int) -> None:
        k = 0
        while not stop.is_set():
            prompt = f"client {i:02d} request {k:03d} keeps the replica busy for a while"
            r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt}, timeout=120)
            text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
            answers.append((prompt, r.status_code, text))
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        up = wait_replicas(url, 2, SCALE_S)  # 12 clients against a batch of 4: scale up
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    down = wait_replicas(url, 1, SCALE_S)  # idle: back to the minimum
    print(f"scaled up after {up:.1f} s of load, down {down:.1f} s after it stopped; "
          f"{len(answers)} requests")
    assert answers and all(status == 200 and text == prompt.upper()
                           for prompt, status, text in answers), \
        [a for a in answers if a[1] != 200 or a[2] != a[0].upper()][:3]


def test_the_drain_refuses_new_requests_and_cancels_what_outlives_the_timeout(cluster):
    """Leaving `replicated` drains: with --shutdown-timeout 1 s, a request needing ~12 s gets
    503 `shutting_down` about a second later, and a request sent during the drain 503 at once."""
    spec = ModelSpec({"delay_s": 0.2}, factory=echo_lm)  # 0.2 s a token
    config = ServerConfig(**CONFIG | {"shutdown_timeout": 1.0})
    out: dict[str, httpx.Response] = {}

    def post(name: str, prompt: str) -> None:
        out[name] = httpx.post(f"{base}/v1/completions", json={"prompt": prompt}, timeout=120)

    def late() -> None:  # once the drain has begun
        while httpx.get(f"{base}/health", timeout=10).status_code == 200:
            time.sleep(0.05)
        post("late", "too late")

    with replicated(spec, config, 1, port=cluster, device="cpu", ready_timeout_s=180) as base:
        long = threading.Thread(target=post, args=("long", "a request of some sixty "
                                                   "characters, twelve seconds long"))
        long.start()
        while httpx.get(f"{base}/health", timeout=10).json()["in_flight"] != 1:
            time.sleep(0.1)
        checker = threading.Thread(target=late)
        checker.start()
        start = time.monotonic()
    took = time.monotonic() - start
    long.join(60)
    checker.join(60)
    for name in ("long", "late"):
        assert out[name].status_code == 503, (name, out[name].text)
        assert out[name].json()["error"]["code"] == "shutting_down", name
    assert "shutdown-timeout" in out["long"].json()["error"]["message"]
    assert took < 1.0 + 10, took
