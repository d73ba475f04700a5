"""SIGTERM on a real `powersmc serve` (a subprocess on the default model, localhost): the port
answers while the model loads (503, then 200); on SIGTERM new requests get 503 at once, a
request in flight finishes within --shutdown-timeout (or is cancelled with 503 when it cannot),
and the process exits 0.

Small for CI (2 cores): N = 4 particles, one torch thread.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from server_toys import serve_process, wait_for  # noqa: E402

pytestmark = pytest.mark.model
START_TIMEOUT_S = 240


def serve(*flags: str):
    """`powersmc serve` on the default model; yields (base URL, process) once ready."""
    return serve_process("--device", "cpu", "--particles", "4", "--max-batch", "8",
                         "--log-level", "warning", *flags,
                         timeout=START_TIMEOUT_S)


def _ask(url: str, body: dict, out: list) -> threading.Thread:
    def go() -> None:
        try:
            out.append(httpx.post(f"{url}/v1/completions", json=body, timeout=300))
        except httpx.HTTPError as exc:
            out.append(exc)
    t = threading.Thread(target=go)
    t.start()
    return t


def _running(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=5).json()["running"] == 1


def test_sigterm_refuses_new_requests_lets_the_running_one_finish_and_exits_0():
    with serve("--shutdown-timeout", "120") as (url, proc):
        out: list = []
        # several answers, each up to 48 tokens: seconds of work on one CPU thread
        t = _ask(url, {"prompt": "Write a long story about a dragon.", "max_tokens": 48,
                       "n": 4, "seed": 0}, out)
        wait_for(lambda: _running(url), timeout=30)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503, timeout=10)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "late"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{url}/health").json()["status"] == "draining"
        t.join(300)
        assert out[0].status_code == 200, out[0].text
        assert len(out[0].json()["choices"]) == 4
        assert proc.wait(60) == 0


def test_sigterm_cancels_what_outlives_the_shutdown_timeout_with_503():
    with serve("--shutdown-timeout", "1") as (url, proc):
        out: list = []
        t = _ask(url, {"prompt": "Once upon a time, there was a dragon who",
                       "max_tokens": 400, "particles": 16, "n": 2, "seed": 0}, out)
        wait_for(lambda: _running(url), timeout=30)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert out[0].status_code == 503, out[0].text
        assert out[0].json()["error"]["code"] == "shutting_down"
        assert proc.wait(60) == 0
        assert time.monotonic() - start < 30
