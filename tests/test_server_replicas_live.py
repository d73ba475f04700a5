"""`powersmc serve --replicas 2` as a user runs it: a subprocess on the default model (its own
local Ray cluster, one thread per replica), driven by the same `openai` client and
lm-evaluation-harness tests as the single process (`test_server_live`, imported here with
this module's `server` fixture): the replicated endpoint must pass them unchanged.
"""

from __future__ import annotations

import signal
import threading

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from server_toys import serve_process, wait_for  # noqa: E402
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
def served():
    """`powersmc serve --replicas 2` on the default model; yields (base URL, process)."""
    with serve_process("--replicas", "2", "--threads", "1", "--api-key", KEY, "--device",
                       "cpu", "--particles", "4", "--max-new-tokens", "24", "--max-batch", "8",
                       "--max-tokens-limit", "100000",
                       "--shutdown-timeout", "120", "--log-level", "warning", replicas=2,
                       timeout=START_TIMEOUT_S, env={"RAY_DEDUP_LOGS": "0"}) as served:
        yield served


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
