"""`powersmc serve` as a user runs it: a subprocess on the default model, on a free localhost
port, started and stopped by this module; driven by the official `openai` client and by
lm-evaluation-harness (`local-completions`) on a three-problem local task.

Kept small for CI (2 cores): N = 4 particles, at most 24 new tokens per answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from server_toys import serve_process  # noqa: E402

pytestmark = pytest.mark.model
KEY = "sk-live-test"
MODEL = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server():
    """A live `powersmc serve` on the default model; yields its base URL."""
    with serve_process("--api-key", KEY, "--device", "cpu", "--particles", "4",
                       "--max-new-tokens", "24", "--max-batch", "8",
                       "--max-tokens-limit", "100000", "--log-level", "warning") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_completion_through_the_openai_client(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is",
                                  max_tokens=12, extra_body={"particles": 4, "alpha": 4.0})
    assert isinstance(r.choices[0].text, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    info = r.model_extra["powersmc"]
    assert info["method"] == "smc" and info["particles"] == 4 and len(info["log_z"]) == 1


def test_chat_and_streaming_agree_for_a_seed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}],
              max_tokens=16, seed=11)
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text.strip()
    stream = client.chat.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == text
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_completion_reproduces(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, seed=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.model_extra["powersmc"]["log_z"] == b.model_extra["powersmc"]["log_z"]


def test_errors_reach_the_openai_client_with_the_field(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"alpha": 0.5})
    assert e.value.body["param"] == "alpha"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, temperature=0.7,
                                       messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:  # beyond the model's context (8192)
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens" and "context" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"particles": 0})
    assert e.value.body["param"] == "particles"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body={"bogus": 1})
    assert e.value.body["param"] == "bogus"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list()] == [MODEL]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client):
    prompts = ["What is 1 + 1?", "Name a colour.", "Count to three:", "Say hello in French.",
               "What is the largest planet in the solar system?", "2 * 4 ="]
    out: dict[int, object] = {}

    def ask(i: int) -> None:
        out[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(out) == list(range(len(prompts)))
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=1, seed=0)
            for p in prompts]
    for i, r in out.items():  # each answer belongs to its own prompt
        assert r.usage.prompt_tokens == solo[i].usage.prompt_tokens
        assert isinstance(r.choices[0].text, str)
    assert max(r.model_extra["powersmc"]["batch_requests"] for r in out.values()) > 1


def test_lm_eval_local_completions_runs_a_local_task(server, tmp_path):
    pytest.importorskip("lm_eval")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY,
                        "TOKENIZERS_PARALLELISM": "false"}
    args = ",".join([f"model={MODEL}", f"base_url={server}/v1/completions",
                     "tokenized_requests=False", "tokenizer_backend=None", "num_concurrent=2",
                     "max_retries=1", "timeout=300"])
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", args, "--tasks", "powersmc_gsm8k_tiny",
           "--include_path", "tests/fixtures/lm_eval", "--output_path", str(tmp_path / "out"),
           "--log_samples"]
    before = httpx.get(f"{server}/health").json()["stats"].get("completed", 0)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = next((tmp_path / "out").rglob("results_*.json"))
    task = json.loads(results.read_text())["results"]["powersmc_gsm8k_tiny"]
    assert 0.0 <= task["exact_match,flexible-extract"] <= 1.0
    assert httpx.get(f"{server}/health").json()["stats"]["completed"] - before == 3


def test_abandoned_requests_stop_at_once(client, server):
    """Six N = 16, 200-token requests whose clients hang up after one second leave the batch
    at the next step: a request sent after them is answered about as fast as on the idle
    server (within 1.5x; the server compares the same seeded request before and after)."""
    body = {"model": MODEL, "prompt": "Say hi.", "max_tokens": 8, "particles": 4, "seed": 5}
    headers = {"Authorization": f"Bearer {KEY}"}

    def timed() -> float:
        start = time.monotonic()
        r = httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return time.monotonic() - start

    timed()  # warm
    idle = min(timed() for _ in range(3))
    heavy = {"model": MODEL, "prompt": "Once upon a time, there was a dragon who",
             "max_tokens": 200, "particles": 16}

    def abandon() -> None:
        try:
            httpx.post(f"{server}/v1/completions", json=heavy, headers=headers, timeout=1.0)
        except httpx.TimeoutException:
            pass

    gone = [threading.Thread(target=abandon) for _ in range(6)]
    for t in gone:
        t.start()
    for t in gone:
        t.join(10)
    time.sleep(3.0)  # the handlers notice the disconnects (they poll every 0.1 s)
    after = min(timed() for _ in range(2))
    stats = httpx.get(f"{server}/health", timeout=5).json()["stats"]
    assert stats.get("cancelled_running", 0) >= 1, stats  # work in the batch was dropped
    assert after <= 1.5 * idle, (after, idle, stats)
