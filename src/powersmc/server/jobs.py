"""From a validated request body to a `Job`: server defaults filled in, every value checked.

Range checks reuse the samplers' own (`methods.common`), so the server says exactly what
`powersmc sample` says, with the request's field name. A `Job` is what the worker runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from powersmc.errors import InputError
from powersmc.methods import common
from powersmc.methods.registry import check_method, check_select_for
from powersmc.server.config import SERVED, ServerConfig
from powersmc.server.errors import APIError, from_input_error
from powersmc.server.schemas import ChatRequest, CompletionRequest

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_MH_MOVES = 100  # MH moves per block (PPT rounds, rejuvenation moves): each regenerates
MAX_RUNGS = 16  # PPT replicas: each is a row of every move
# alpha beyond this is greedy decoding to float precision; a finite alpha near float32's max
# (3.4e38) overflows inside the samplers
MAX_ALPHA = 1000.0
MAX_RAMP = 1_000_000  # ramp_tokens: longer than any answer already, and safe as a float
_TARGET_CHANGING = ("temperature", "top_p", "top_k")


@dataclass
class Job:
    """One request, resolved: prompts (texts, token-id lists, or chat message lists), n
    answers per prompt, the method and its options, and how to present the answers."""

    chat: bool
    prompts: list[Any]
    n: int
    method: str
    alpha: float
    max_tokens: int
    seed: int | None
    options: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    timeout: float | None = None  # seconds until the answer stops being wanted (None: never)

    @property
    def systems(self) -> int:
        """Independent answers to draw: for SMC, particle systems in the batch."""
        return len(self.prompts) * self.n


def _check(fn, *args):
    try:
        return fn(*args)
    except InputError as exc:
        raise from_input_error(exc) from None


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _neutral(req: CompletionRequest | ChatRequest) -> None:
    """OpenAI fields this server cannot honour: allowed only at their no-op values."""
    checks = {
        "presence_penalty": req.presence_penalty in (None, 0),
        "frequency_penalty": req.frequency_penalty in (None, 0),
        "logit_bias": not req.logit_bias,
        "logprobs": req.logprobs in (None, False, 0),
    }
    if isinstance(req, CompletionRequest):
        checks |= {"echo": not req.echo, "best_of": req.best_of in (None, 1),
                   "suffix": not req.suffix}
    else:
        checks["top_logprobs"] = req.top_logprobs in (None, 0)
    for name, ok in checks.items():
        if not ok:
            raise _bad(name, "not supported by this server (answers are whole sequences drawn "
                       "from the power distribution); leave it out", "unsupported_field")


def _sampling_controls(req, method: str) -> dict[str, Any]:
    """temperature / top_p / top_k: options of plain sampling (temperature also of 'maj',
    self-consistency's samples); for every other method they would change the target
    distribution, so anything but their neutral value is refused."""
    t, p, k = req.temperature, req.top_p, req.top_k
    if method == "maj" and (p in (None, 1) and k is None):
        if t is not None and not (math.isfinite(t) and 0 < t <= 2):
            raise _bad("temperature", f"a number in (0, 2] for maj (got {t!r})")
        return {"temperature": 1.0 if t is None else float(t)}
    if method != "plain":
        for name, value, neutral in (("temperature", t, 1), ("top_p", p, 1), ("top_k", k, None)):
            if value is not None and value != neutral:
                raise _bad(name, f"method {method!r} samples a fixed target (pi_alpha ~ p^alpha "
                           "for the power methods); a temperature / top_p / top_k would change "
                           "it. They are accepted only with method 'plain'; sharpen with "
                           "'alpha' instead", "target_changing_option")
        return {}
    if t is not None and not (math.isfinite(t) and 0 <= t <= 2):
        raise _bad("temperature", f"a number in [0, 2] (got {t!r})")
    if p is not None and not (math.isfinite(p) and 0 < p <= 1):
        raise _bad("top_p", f"a number in (0, 1] (got {p!r})")
    if k is not None and k < 1:
        raise _bad("top_k", f"an integer >= 1 (got {k!r})")
    return {"temperature": 1.0 if t is None else float(t), "top_p": p, "top_k": k}


def _method_options(req, cfg: ServerConfig, method: str) -> dict[str, Any]:
    """Every served option (`methods.options`), checked (given ones even when the method does
    not use them), then only those `method` takes; then this server's caps."""
    d = cfg.defaults
    val = {o.name: _check(o.validate, d[o.name] if getattr(req, o.name) is None
                          else getattr(req, o.name)) for o in SERVED}
    if val["particles"] > cfg.max_particles:
        raise _bad("particles", f"at most {cfg.max_particles} on this server (--max-particles)"
                   f" (got {val['particles']})")
    if req.select is not None:
        _check(check_select_for, [method], req.select)
    for name, cap in (("num_blocks", cfg.max_tokens_limit), ("horizon", cfg.max_tokens_limit),
                      ("mh_moves", MAX_MH_MOVES), ("ramp_tokens", MAX_RAMP),
                      ("rejuvenate_moves", MAX_MH_MOVES), ("maj_samples", cfg.max_particles)):
        if val[name] is not None and val[name] > cap:  # bound one request's work
            raise _bad(name, f"at most {cap} on this server (got {val[name]})")
    if val["alphas"] is not None and len(val["alphas"]) > MAX_RUNGS:
        raise _bad("alphas", f"at most {MAX_RUNGS} rungs on this server (got "
                   f"{len(val['alphas'])})")
    if val["candidates"] * val["rollouts"] > cfg.max_particles:
        # name the field the request set (rollouts if both or neither)
        name = "candidates" if req.candidates is not None and req.rollouts is None \
            else "rollouts"
        raise _bad(name, f"candidates x rollouts at most {cfg.max_particles} on this "
                   f"server (--max-particles) (got {val['candidates']} x {val['rollouts']})")
    return {o.name: val[o.name] for o in SERVED if method in o.methods}


def _prompts(req: CompletionRequest) -> list[Any]:
    p = req.prompt
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts:
        raise _bad("prompt", "a non-empty prompt or list of prompts")
    for x in prompts:
        if (isinstance(x, str) and not x.strip()) or (not isinstance(x, str) and not x):
            raise _bad("prompt", "every prompt must be non-empty")
        if not isinstance(x, str) and min(x) < 0:
            raise _bad("prompt", "token ids must be >= 0")
    return prompts


def _timeout(asked: float | None, limit: float | None) -> float | None:
    """The request's deadline in seconds: its `timeout` field capped by --request-timeout."""
    if asked is not None and not (math.isfinite(asked) and asked > 0):
        raise _bad("timeout", f"a positive number of seconds (got {asked!r})")
    if asked is None or (limit is not None and asked > limit):
        return limit
    return float(asked)


def resolve(req: CompletionRequest | ChatRequest, cfg: ServerConfig) -> Job:
    """Fill in the server's defaults and check every value; raises `APIError` (4xx)."""
    if req.model is not None and req.model != cfg.model_name:
        raise APIError(404, f"model: this server serves {cfg.model_name!r}, not {req.model!r}",
                       param="model", code="model_not_found")
    _neutral(req)
    method = _check(check_method, req.method or cfg.defaults["method"])
    alpha = _check(common.check_alpha, cfg.defaults["alpha"] if req.alpha is None else req.alpha)
    if alpha > MAX_ALPHA:
        raise _bad("alpha", f"at most {MAX_ALPHA:g} on this server (got {alpha!r})")
    chat = isinstance(req, ChatRequest)
    completion_max = req.max_completion_tokens if isinstance(req, ChatRequest) else None
    max_tokens = req.max_tokens if completion_max is None else completion_max
    name = "max_tokens" if completion_max is None else "max_completion_tokens"
    max_tokens = cfg.defaults["max_tokens"] if max_tokens is None else max_tokens
    if max_tokens < 1 or max_tokens > cfg.max_tokens_limit:
        raise _bad(name, f"an integer in [1, {cfg.max_tokens_limit}] on this server "
                   f"(got {max_tokens})")
    timeout = _timeout(req.timeout, cfg.request_timeout)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise _bad("stop", f"at most {MAX_STOP} non-empty strings")
    if not 1 <= req.n <= cfg.max_choices:
        raise _bad("n", f"an integer in [1, {cfg.max_choices}] (got {req.n})")
    options = _method_options(req, cfg, method) | _sampling_controls(req, method)
    if isinstance(req, ChatRequest):
        if not req.messages:
            raise _bad("messages", "a non-empty list of messages")
        # 'developer' is OpenAI's newer name for 'system'; chat templates know 'system'
        prompts = [[{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]]
    else:
        prompts = _prompts(req)
    if len(prompts) * req.n > cfg.max_choices:
        # name what makes it too many: the prompt list when one answer each was asked
        raise _bad("n" if req.n > 1 else "prompt", f"prompts x n at most {cfg.max_choices} "
                   f"on this server (got {len(prompts)} x {req.n})")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Job(chat=chat, prompts=prompts, n=req.n, method=method, alpha=alpha,
               max_tokens=max_tokens, seed=req.seed, options=options, stop=stop,
               stream=req.stream, include_usage=include_usage, timeout=timeout)
