"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every 4xx names the offending field in `param` (and in the message), so a client can tell
what to fix without reading server logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from powersmc.errors import InputError

# Sampler argument names -> the request field a client sent.
_FIELD_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client with `status` and the OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def shutting_down(timeout: float | None = None) -> APIError:
    """The 503 of a server that is shutting down; with `timeout` (--shutdown-timeout), the one
    a request gets when the drain cancels it for not finishing in time."""
    if timeout is None:
        return APIError(503, "the server is shutting down", code="shutting_down")
    return APIError(503, "the server is shutting down and this request did not finish within "
                    f"--shutdown-timeout ({timeout:g} s); its work was cancelled",
                    code="shutting_down")


def field_name(argument: str) -> str:
    """The request field behind a sampler argument name (`max_new_tokens` -> `max_tokens`)."""
    name = argument.lstrip("-").replace("-", "_")
    return _FIELD_NAMES.get(name, name)


def from_input_error(exc: InputError) -> APIError:
    """A sampler's `InputError` (it names its argument) as a 400 naming the request field."""
    param = field_name(exc.argument)
    message = str(exc)
    if message.startswith(exc.argument):
        message = param + message[len(exc.argument):]
    return APIError(400, message, param=param, code="invalid_value")


def _where(loc: list[Any]) -> str:
    """A field path as a client writes it: messages[0].content."""
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out or "body"


def from_validation_errors(errors: Sequence[Mapping[str, Any]], fields: set[str]) -> APIError:
    """Pydantic's first error as a 400 naming the field (unknown, wrong type, missing).

    `fields` holds every declared field name: other strings in an error's location are the
    type tags pydantic adds for the branches of a union (`prompt.str`, `prompt.list[int]`);
    they are folded into one 'expected ...' message."""
    err = errors[0]
    loc = list(err.get("loc", ()))
    param = str(loc[0]) if loc else None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return APIError(400, f"{_where(loc)}: unknown field (not an OpenAI field this server "
                        "takes, nor a powersmc option)", param=param, code="unknown_field")
    path = [x for x in loc if not isinstance(x, str) or x in fields]
    if kind == "missing":
        return APIError(400, f"{_where(path)}: required field missing", param=param,
                        code="missing_field")
    if kind == "value_error":  # a field validator's range check: its message says what is allowed
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        return APIError(400, f"{_where(path)}: {message}", param=param, code="invalid_value")
    tags = []
    for e in errors:
        eloc = list(e.get("loc", ()))
        if [x for x in eloc if not isinstance(x, str) or x in fields][: len(path)] == path:
            tags += [x for x in eloc[len(path):] if isinstance(x, str) and x not in fields][:1]
    if len(tags) > 1:
        expected = ", ".join(dict.fromkeys(tags))
        return APIError(400, f"{_where(path)}: wrong type (expected one of: {expected})",
                        param=param, code="invalid_type")
    return APIError(400, f"{_where(path)}: {err.get('msg', 'invalid value')}", param=param,
                    code="invalid_type")
