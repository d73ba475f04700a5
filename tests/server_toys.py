"""A text toy model and an in-process live server for the server tests.

`EchoLM` is a `FunctionLM` over ASCII codes whose answer to a prompt is, with probability
~0.97 per token, the prompt in upper case followed by EOS: an answer can be checked against
its own prompt, so a response routed to the wrong request shows. `gate` (an Event) makes the
worker block at its next prefill until released, to fill the queue deterministically; a
prompt containing "boom" raises inside the batch.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx

from powersmc import FunctionLM

EOS, SEP, VOCAB = 0, 1, 128


def _next(prefix: tuple[int, ...]) -> list[float]:
    cut = len(prefix) - 1 - prefix[::-1].index(SEP)
    prompt, done = prefix[:cut], len(prefix) - cut - 1
    answer = [ord(chr(c).upper()) for c in prompt] + [EOS]
    want = answer[done] if done < len(answer) else EOS
    rest = math.log(0.03 / (VOCAB - 1))
    out = [rest] * VOCAB
    out[want] = math.log(0.97)
    return out


class EchoLM(FunctionLM):
    """Text in, upper-cased echo out (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(_next, vocab_size=VOCAB, eos_token_ids=[EOS], max_context=256)
        self.gate = threading.Event()
        self.gate.set()
        self.seen: list[str] = []  # decoded prompts of every prefill, in order

    def encode_prompt(self, prompt):
        if isinstance(prompt, str):
            return [ord(c) for c in prompt if 2 <= ord(c) < VOCAB] + [SEP]
        return super().encode_prompt(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode_prompt(" ".join(m["content"] for m in messages if m["role"] == "user"))

    def decode(self, token_ids) -> str:
        return "".join(chr(int(i)) for i in token_ids if int(i) not in (EOS, SEP))

    def _evaluating(self, prompts) -> None:
        """Record the prompts, wait for the gate, fail on a 'boom' prompt."""
        texts = [self.decode(p) for p in prompts]
        self.seen.extend(texts)
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        if any("boom" in t for t in texts):
            raise RuntimeError("boom: a failure inside the batch")

    def prefill_many(self, prompts, rows, **kw):
        self._evaluating(prompts)
        return super().prefill_many(prompts, rows, **kw)

    def extend(self, state, prompts, rows, **kw):  # a request joining the running batch
        self._evaluating(prompts)
        return super().extend(state, prompts, rows, **kw)

    def prefill(self, prompt_ids, rows, **kw):
        return self.prefill_many([prompt_ids], rows, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(lm, **config) -> Iterator[str]:
    """Serve `lm` with `ServerConfig(**config)` on a free localhost port in this process;
    yields the base URL and stops the server on exit."""
    import uvicorn

    from powersmc.server import ServerConfig, create_app

    app = create_app(lm, ServerConfig(**config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def serve_process(*flags: str, replicas: int = 0, timeout: float = 240,
                  env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`powersmc serve *flags` as a user runs it: a subprocess on a free localhost port on the
    default model (one torch thread unless OMP_NUM_THREADS says otherwise); yields (base URL,
    process) once /health is 200 (with `replicas`, once that many replicas are ready). Its
    own session, stderr to a file (a pipe fills): at the end SIGTERM, then SIGKILL of the
    whole group (Ray leaves a local cluster's agents behind the process that started it)."""
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} | (env or {})
    cmd = [sys.executable, "-m", "powersmc", "serve", "--port", str(port), *flags]
    err = tempfile.NamedTemporaryFile("w+", prefix="powersmc-serve-", suffix=".log")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err.seek(0)
                raise RuntimeError(f"powersmc serve exited {proc.returncode}: "
                                   f"{err.read()[-3000:]}")
            with suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 200 and r.json().get("ready_replicas", 1) >= replicas:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"powersmc serve did not come up within {timeout:g} s")
            time.sleep(0.25)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        err.close()


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll `predicate()` until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


class SlowEchoLM(EchoLM):
    """`EchoLM` taking `delay_s` seconds per decoding step: requests stay in flight long
    enough to kill the process serving them."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def step(self, state, tokens):
        time.sleep(self.delay_s)
        return super().step(state, tokens)


def echo_lm(threads: int | None = None, delay_s: float = 0.0) -> EchoLM:
    """A picklable factory (`ModelSpec(factory=echo_lm)`) for Ray Serve replicas."""
    return SlowEchoLM(delay_s) if delay_s else EchoLM()
