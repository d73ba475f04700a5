"""`powersmc serve --replicas 2` as a user runs it: a subprocess on the default model (its own
local Ray cluster, one thread per replica), driven by the same `openai` client and
lm-evaluation-harness tests as the single process (`test_server_live`, imported here with
this module's `server` fixture): the replicated endpoint must pass them unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from server_toys import free_port, wait_for  # noqa: E402
from test_server_live import (  # noqa: E402, F401 - collected here, against two replicas
    KEY,
    client,
    test_chat_and_streaming_agree_for_a_seed,
    test_completion_through_the_openai_client,
    test_concurrent_requests_are_batched_and_each_gets_its_own_answer,
    test_errors_reach_the_openai_client_with_the_field,
    test_lm_eval_local_completions_runs_a_local_task,
    test_seeded_completion_reproduces,
)

pytestmark = pytest.mark.model
START_TIMEOUT_S = 300
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`powersmc serve --replicas 2` on the default model; yields (base URL, process)."""
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "powersmc", "serve", "--replicas", "2", "--threads", "1",
           "--port", str(port), "--api-key", KEY, "--device", "cpu", "--particles", "4",
           "--max-new-tokens", "24", "--max-batch", "8", "--batch-wait-ms", "200",
           "--max-tokens-limit", "100000", "--shutdown-timeout", "120",
           "--log-level", "warning"]
    # its own session: Ray 2.60 leaves a local cluster's agents behind the process that
    # started it, so the whole group is killed at the end; stderr to a file (a pipe fills)
    err = tmp_path_factory.mktemp("serve") / "stderr.log"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err.open("w"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"powersmc serve exited {proc.returncode}: {err.read_text()[-3000:]}")
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 200 and r.json()["ready_replicas"] == 2:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("powersmc serve --replicas 2 did not come up in time")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(served):
    """The base URL (the fixture `test_server_live`'s tests ask for)."""
    return served[0]


def test_two_replicas_answer_and_report(server, client):  # noqa: F811 - the fixture
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1 + 1 =",
                                  max_tokens=4)
    assert r.usage.completion_tokens > 0
    body = httpx.get(f"{server}/health", timeout=10).json()
    assert body["ready_replicas"] == 2
    assert {rep["threads"] for rep in body["replicas"].values()} == {1}
    assert 'replica="all"' in httpx.get(f"{server}/metrics", timeout=10).text


def test_sigterm_drains_the_replicas_and_exits_0(served):
    """Last in this module (it stops the server): on SIGTERM new requests get 503 at once, the
    request in flight finishes with its whole answer, and the process exits 0."""
    url, proc = served
    out: list = []

    def ask() -> None:
        try:
            out.append(httpx.post(f"{url}/v1/chat/completions", timeout=300, headers=AUTH,
                                  json={"messages": [{"role": "user", "content":
                                                      "Write a long story about a dragon."}],
                                        "max_tokens": 64, "n": 4, "seed": 0}))
        except httpx.HTTPError as exc:
            out.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    wait_for(lambda: httpx.get(f"{url}/health", timeout=5).json()["running"] == 1, timeout=60)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503, timeout=30)
    late = httpx.post(f"{url}/v1/completions", json={"prompt": "late"}, headers=AUTH,
                      timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "draining"
    t.join(300)
    assert out[0].status_code == 200, out[0]
    choices = out[0].json()["choices"]
    assert len(choices) == 4 and all(c["message"]["content"] for c in choices)
    assert proc.wait(120) == 0
