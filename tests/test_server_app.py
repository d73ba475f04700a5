"""`powersmc serve` in process, on a toy text model (fast): routes, OpenAI shapes, options,
bad input, auth, limits, batching, seeds, disconnects, queue bounds and failing batches.

The same contract on the default model, through the official `openai` client and
lm-evaluation-harness, is in test_server_live.py.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_toys import EchoLM, health, live_server, wait_for  # noqa: E402
from toy_models import row_limited  # noqa: E402

import powersmc  # noqa: E402

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = dict(model_name="toy", api_key=KEY, max_particles=32, max_batch=8, max_queue=8,
              max_body_bytes=16_384,
              defaults={"method": "smc", "alpha": 4.0, "particles": 4, "ess_threshold": 0.5,
                        "resampler": "systematic", "ramp_tokens": 0, "order": "standard",
                        "max_tokens": 32,
                        "num_blocks": 2, "mh_moves": 1, "candidates": 2, "rollouts": 2,
                        "horizon": 4})


@pytest.fixture(scope="module")
def toy():
    lm = EchoLM()
    with live_server(lm, **CONFIG) as url:
        yield url, lm


def post(url: str, path: str, body, headers=AUTH, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, headers=headers, timeout=timeout)


def test_models_and_health(toy):
    url, _ = toy
    r = httpx.get(f"{url}/v1/models", headers=AUTH)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "toy"
    h = health(url)
    assert h["status"] == "ok" and h["model"] == "toy"


def test_completion_shape_answer_and_powersmc_object(toy):
    url, _ = toy
    r = post(url, "completions", {"model": "toy", "prompt": "abc", "max_tokens": 8,
                                  "particles": 4, "alpha": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "toy"
    (choice,) = body["choices"]
    assert choice["text"] == "ABC" and choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    info = body["powersmc"]
    assert info["method"] == "smc" and info["alpha"] == 4.0 and info["particles"] == 4
    assert len(info["log_z"]) == 1 and isinstance(info["log_z"][0], float)
    assert isinstance(info["resample_steps"][0], list)
    assert info["token_evals"] > 0 and info["seconds"] > 0 and info["queue_seconds"] >= 0


def test_chat_uses_the_backend_template_and_length_finish(toy):
    url, _ = toy
    r = post(url, "chat/completions", {"messages": [{"role": "system", "content": "ignored"},
                                                    {"role": "user", "content": "hello"}],
                                       "max_tokens": 3})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": "HEL"}
    assert choice["finish_reason"] == "length"


def test_n_and_prompt_lists_are_prompt_major_and_stop_truncates(toy):
    url, _ = toy
    r = post(url, "completions", {"prompt": ["ab", "xyz"], "n": 2, "max_tokens": 8})
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == ["AB", "AB", "XYZ", "XYZ"]
    assert r.json()["powersmc"]["batch_prompts"] == 4
    r = post(url, "completions", {"prompt": "abcdef", "stop": ["D", "E"], "max_tokens": 8})
    (choice,) = r.json()["choices"]
    assert choice["text"] == "ABC" and choice["finish_reason"] == "stop"
    r = post(url, "completions", {"prompt": [ord("q"), 1], "max_tokens": 8})
    assert r.json()["choices"][0]["text"] == "Q"


@pytest.mark.parametrize("extra", [
    {"method": "plain"}, {"method": "plain", "temperature": 0.5, "top_p": 0.9, "top_k": 5},
    {"method": "plain", "temperature": 0}, {"method": "lowtemp"}, {"method": "greedy"},
    {"method": "mh", "num_blocks": 2, "mh_moves": 1}, {"method": "mh-faithful"},
    {"method": "spower", "candidates": 2, "rollouts": 2, "horizon": 2},
    {"method": "bon", "particles": 3}, {"method": "smc-adapted"},
    {"temperature": 1.0, "top_p": 1.0},  # neutral values do not change the target
    {"order": "adapted", "resampler": "multinomial"},
])
def test_every_method_answers(toy, extra):
    url, _ = toy
    r = post(url, "completions", {"prompt": "ok", "max_tokens": 6, "seed": 1, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["powersmc"]["method"] == extra.get("method", "smc")
    assert len(body["choices"]) == 1 and isinstance(body["choices"][0]["text"], str)


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "alpha": 0.5}, 400, "alpha"),
    ({"prompt": "x", "particles": 0}, 400, "particles"),
    ({"prompt": "x", "particles": 33}, 400, "particles"),
    ({"prompt": "x", "particles": 4.0}, 400, "particles"),
    ({"prompt": "x", "max_tokens": 300}, 400, "max_tokens"),  # context 256
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),  # --max-tokens-limit
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "x", "ess_threshold": 2}, 400, "ess_threshold"),
    ({"prompt": "x", "resampler": "magic"}, 400, "resampler"),
    ({"prompt": "x", "order": "reverse"}, 400, "order"),
    ({"prompt": "x", "method": "ppt", "alphas": [3, 2]}, 400, "alphas"),
    ({"prompt": "x", "method": "ppt", "alphas": [0.5, 2]}, 400, "alphas"),
    ({"prompt": "x", "method": "ppt", "alphas": list(range(1, 30))}, 400, "alphas"),
    ({"prompt": "x", "method": "ecmh", "cut_power": -1}, 400, "cut_power"),
    ({"prompt": "x", "method": "ppt", "mh_moves": -1}, 400, "mh_moves"),
    ({"prompt": "x", "method": "smc-rm", "rejuvenate_moves": -1}, 400, "rejuvenate_moves"),
    ({"prompt": "x", "method": "mh", "select": "consensus"}, 400, "select"),
    ({"prompt": "x", "method": "smc", "select": "best"}, 400, "select"),
    ({"prompt": "x", "method": "maj", "maj_samples": 0}, 400, "maj_samples"),
    ({"prompt": "x", "method": "beam"}, 400, "method"),
    ({"prompt": "x", "temperature": 0.7}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0.9}, 400, "top_p"),
    ({"prompt": "x", "top_k": 40}, 400, "top_k"),
    ({"prompt": "x", "method": "plain", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "method": "mh", "mh_moves": 10_000}, 400, "mh_moves"),
    ({"prompt": "x", "method": "spower", "candidates": 8, "rollouts": 8}, 400, "rollouts"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 65}, 400, "n"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "stream_options": {"include_usage": True, "extra": 1}}, 400,
     "stream_options"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [999, 1]}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_bad_completion_input_names_the_field(toy, body, status, param):
    url, _ = toy
    r = post(url, "completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
     "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
])
def test_bad_chat_input_names_the_field(toy, body, param):
    url, _ = toy
    r = post(url, "chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_malformed_json_and_non_object_bodies(toy):
    url, _ = toy
    for raw in (b'{"prompt": "x",', b'[1, 2]', b'{"prompt": "x", "alpha": NaN}'):
        r = httpx.post(f"{url}/v1/completions", content=raw,
                       headers=AUTH | {"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", raw


def test_auth_is_required_on_v1_routes(toy):
    url, _ = toy
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(url, "completions", {"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_body_size_limit_with_and_without_content_length(toy):
    url, _ = toy
    big = {"prompt": "x" * 20_000}
    assert post(url, "completions", big).status_code == 413

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = httpx.post(f"{url}/v1/completions", content=chunks(),
                   headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_route_is_an_openai_error(toy):
    url, _ = toy
    r = httpx.get(f"{url}/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()


def _sse(url: str, path: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{url}/v1/{path}", json=body | {"stream": True}, headers=AUTH,
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_sends_the_answer_then_finish_and_usage(toy):
    url, _ = toy
    chunks = _sse(url, "chat/completions", {"messages": [{"role": "user", "content": "hey"}],
                                            "stream_options": {"include_usage": True}})
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "HEY"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["powersmc"]
    chunks = _sse(url, "completions", {"prompt": "yo"})
    assert "".join(c["choices"][0]["text"] for c in chunks) == "YO"
    assert chunks[-1]["powersmc"]["method"] == "smc"


def test_seeded_request_reproduces_and_equals_the_library(toy):
    url, _ = toy
    body = {"prompt": "seed me", "seed": 7, "max_tokens": 12, "particles": 8, "n": 2}
    a, b = post(url, "completions", body).json(), post(url, "completions", body).json()
    assert a["choices"] == b["choices"]
    assert a["powersmc"]["log_z"] == b["powersmc"]["log_z"]
    assert a["powersmc"]["seed"] == 7 and a["powersmc"]["batch_requests"] == 1
    lm = EchoLM()
    ids = lm.encode_prompt("seed me")
    lib = powersmc.smc_sample_many(lm, [ids, ids], alpha=4.0, particles=8, max_new_tokens=12,
                                   seed=7)
    assert a["powersmc"]["log_z"] == [r.log_z for r in lib]
    assert a["powersmc"]["resample_steps"] == [r.resample_steps for r in lib]


def test_a_failing_batch_gets_500_and_the_server_goes_on(toy):
    url, _ = toy
    r = post(url, "completions", {"prompt": "boom"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "batch_failed"
    assert post(url, "completions", {"prompt": "fine"}).json()["choices"][0]["text"] == "FINE"


# ---- batching, queue bound and disconnects: the worker is held at a gate to make the queue
# ---- state deterministic.

@pytest.fixture
def gated():
    lm = EchoLM()
    with live_server(lm, **(CONFIG | {"max_queue": 4})) as url:
        yield url, lm
        lm.gate.set()


def _send_async(url: str, body: dict, out: list, timeout: float = 30) -> threading.Thread:
    def go():
        try:
            out.append(post(url, "completions", body, timeout=timeout))
        except httpx.HTTPError as exc:
            out.append(exc)
    t = threading.Thread(target=go)
    t.start()
    return t


def _block_worker(url: str, lm: EchoLM) -> tuple[threading.Thread, list]:
    lm.gate.clear()
    out: list = []
    t = _send_async(url, {"prompt": "first", "seed": 0}, out)
    wait_for(lambda: health(url)["running"] == 1)
    return t, out


def test_concurrent_requests_with_different_settings_share_the_running_batch(gated):
    """Continuous batching: requests with other methods, alphas (and seeds) join the batch
    that is already running, each gets its own answer with its own settings: Power-SMC at
    another alpha, and best-of-N, greedy and low-temperature decoding (systems that never
    resample)."""
    url, lm = gated
    blocker, _ = _block_worker(url, lm)
    asks = {"aa": {"alpha": 2.0}, "bbb": {"method": "bon", "particles": 3},
            "cccc": {"method": "greedy", "n": 2}, "dd": {"method": "lowtemp", "seed": 5}}
    results: dict[str, list] = {p: [] for p in asks}
    threads = [_send_async(url, {"prompt": p, **extra}, results[p]) for p, extra in asks.items()]
    wait_for(lambda: health(url)["queued"] == 4)
    lm.gate.set()
    for t in [blocker, *threads]:
        t.join(30)
    shared = []
    for prompt, (r,) in results.items():
        body = r.json()
        want = asks[prompt]
        assert [c["text"] for c in body["choices"]] == [prompt.upper()] * want.get("n", 1)
        shared.append(body["powersmc"]["batch_requests"])
        assert body["powersmc"]["method"] == want.get("method", "smc")
        assert body["powersmc"]["alpha"] == want.get("alpha", 4.0)
    assert max(shared) >= 4  # every method, both alphas and the seeded blocker in one batch


def test_an_mh_request_does_not_stall_the_batch(gated):
    """An MH request (T = 64, 4 blocks x 5 moves: 20 proposals in turn) and Power-SMC requests
    sent together: the MH proposals are rows of the same batch, so the SMC requests finish
    first instead of waiting for the whole chain."""
    url, lm = gated
    blocker, _ = _block_worker(url, lm)
    done: list[tuple[str, float]] = []

    def send(name: str, body: dict) -> threading.Thread:
        def go():
            r = post(url, "completions", body, timeout=60)
            assert r.status_code == 200, r.text
            done.append((name, time.monotonic()))
        t = threading.Thread(target=go)
        t.start()
        return t

    threads = [send("mh", {"prompt": "chain", "method": "mh", "max_tokens": 64,
                           "num_blocks": 4, "mh_moves": 5, "seed": 1})]
    wait_for(lambda: health(url)["queued"] == 1)
    threads += [send(f"smc{i}", {"prompt": f"s{i}", "seed": i}) for i in range(3)]
    wait_for(lambda: health(url)["queued"] == 4)
    lm.gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    order = [name for name, _ in sorted(done, key=lambda x: x[1])]
    assert len(order) == 4 and order[-1] == "mh", order


def test_full_queue_answers_429_and_recovers(gated):
    url, lm = gated
    blocker, _ = _block_worker(url, lm)
    queued: list = []
    threads = [_send_async(url, {"prompt": f"q{i}", "seed": i}, queued) for i in range(4)]
    wait_for(lambda: health(url)["queued"] == 4)
    r = post(url, "completions", {"prompt": "one too many"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert r.headers["retry-after"] == "1"
    lm.gate.set()
    for t in [blocker, *threads]:
        t.join(30)
    assert sorted(q.json()["choices"][0]["text"] for q in queued) == ["Q0", "Q1", "Q2", "Q3"]


def test_a_client_that_disconnects_has_its_work_dropped(gated):
    url, lm = gated
    blocker, _ = _block_worker(url, lm)
    gone: list = []
    _send_async(url, {"prompt": "never run", "seed": 1}, gone, timeout=0.5).join(10)
    assert isinstance(gone[0], httpx.TimeoutException)
    wait_for(lambda: health(url)["stats"].get("cancelled_waiting") == 1)
    assert health(url)["queued"] == 0
    lm.gate.set()
    blocker.join(30)
    assert post(url, "completions", {"prompt": "after"}).json()["choices"][0]["text"] == "AFTER"
    assert "never run" not in lm.seen


@pytest.mark.parametrize("args,needle", [
    (["--max-batch", "0"], "--max-batch"),
    (["--particles", "100", "--max-particles", "64"], "--particles"),
    (["--method", "beam"], "method"),
    (["--port", "70000"], "--port"),
    (["--alpha", "0.5"], "alpha"),
])
def test_serve_rejects_bad_settings_before_loading_the_model(args, needle, capsys):
    from powersmc.cli import main

    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("powersmc serve: error")


def test_non_finite_diagnostics_leave_as_json_null():
    from powersmc.server.responses import finite

    info = {"log_z": [float("-inf"), -1.5], "seconds": float("nan"), "method": "smc"}
    assert json.dumps(finite(info), allow_nan=False) == (
        '{"log_z": [null, -1.5], "seconds": null, "method": "smc"}')


def test_row_limited_backend_runs_large_batches_in_chunks():
    """A backend that holds at most `max_rows` rows (llama.cpp: 255 sequences) gets an SMC
    batch in chunks of whole particle systems; every answer is still its own prompt's."""
    lm = EchoLM()
    prefills = row_limited(lm, 8)  # two systems of 4 particles per chunk
    with live_server(lm, **CONFIG) as url:
        r = post(url, "completions", {"model": "toy", "prompt": ["ab", "cd", "ef"], "n": 1,
                                      "max_tokens": 8, "particles": 4, "seed": 3})
        again = post(url, "completions", {"model": "toy", "prompt": ["ab", "cd", "ef"],
                                          "n": 1, "max_tokens": 8, "particles": 4, "seed": 3})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == ["AB", "CD", "EF"]
    assert r.json()["choices"] == again.json()["choices"]
    assert max(prefills) == 8  # the batch holds the row limit, never more
