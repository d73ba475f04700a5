"""Server settings: the sampling defaults a request may override, and the limits it may not.

Kept free of web-framework imports so the CLI can build it (and validate it) before loading
anything heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from powersmc.errors import InputError
from powersmc.methods import common
from powersmc.methods.options import OPTIONS, check_all
from powersmc.methods.registry import check_method

SERVED = tuple(o for o in OPTIONS if o.served)
"""The method options a request may set (`methods.options`)."""


def default_settings() -> dict[str, Any]:
    """The sampling defaults of a server started without flags."""
    return {"method": "smc", "alpha": 4.0, "max_tokens": 256} | {
        o.name: o.default for o in SERVED}


@dataclass
class ServerConfig:
    """What `powersmc serve` was started with.

    defaults: per-request sampling options used when a request leaves them out, in the
        samplers' own names (method, alpha, max_tokens and every served option of
        `methods.options`); those left out here take `default_settings()`.
    max_particles: cap on `particles` (and on candidates x rollouts for spower): one request
        may not ask for an arbitrarily large batch.
    max_tokens_limit: cap on `max_tokens` on top of the model's context check.
    max_choices: cap on prompts x n of one request.
    max_batch: most requests' units (particle systems, continuation groups) in the scheduler's
        batch at once; more wait for rows (`server.worker`).
    max_queue: most requests waiting to run; more are answered 429.
    max_body_bytes: request bodies above this are answered 413.
    api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>`.
    request_timeout: seconds a request may take, queue included, before it is answered 408
        and its work cancelled (a request's `timeout` field may ask for less); None: no limit.
    shutdown_timeout: on SIGTERM, seconds the requests already admitted may take to finish
        before the rest are cancelled (503) and the server exits.
    model_name: the id served at /v1/models and accepted in the `model` field.
    """

    model_name: str = "powersmc"
    defaults: dict[str, Any] = field(default_factory=default_settings)
    max_particles: int = 64
    max_tokens_limit: int = 2048
    max_choices: int = 64
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        """Check the settings once, with the same messages the samplers use; settings left
        out of `defaults` take their default."""
        d = self.defaults = default_settings() | self.defaults
        check_method(d["method"])
        common.check_alpha(d["alpha"])
        common.check_positive_int("max_tokens", d["max_tokens"])
        check_all(d, only=[o.name for o in SERVED])
        for name in ("max_particles", "max_tokens_limit", "max_choices", "max_batch",
                     "max_queue", "max_body_bytes"):
            common.check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        if d["particles"] > self.max_particles:
            raise InputError("--particles", f"at most --max-particles ({self.max_particles})",
                             d["particles"])
        if d["max_tokens"] > self.max_tokens_limit:
            raise InputError("--max-new-tokens",
                             f"at most --max-tokens-limit ({self.max_tokens_limit})",
                             d["max_tokens"])
        if self.request_timeout is not None and not (
                math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise InputError("--request-timeout", "a positive number of seconds",
                             self.request_timeout)
        if not (math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise InputError("--shutdown-timeout", "a number of seconds >= 0",
                             self.shutdown_timeout)
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("--api-key", "a non-empty key", self.api_key)
