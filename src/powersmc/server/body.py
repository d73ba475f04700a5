"""Reading a request body: at most `--max-body-bytes`, JSON, an object, not nested deeper than
`MAX_DEPTH`, every string valid Unicode. Each failure is a 4xx `APIError`, never a crash.

Why the last two: `json.loads` of a body like `[[[[...` ten thousand deep raises
`RecursionError` (which is not a `ValueError`, so it used to escape as a 500 and drop the
connection); and JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer and no
UTF-8 response can carry.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from powersmc.server.errors import APIError

# Deeper than any request this server takes (messages[i].content[j].text is 5 levels).
MAX_DEPTH = 32


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_json")


def check_tree(body: Any, max_depth: int = MAX_DEPTH) -> None:
    """Walk a parsed body without recursion: at most `max_depth` levels of arrays / objects,
    and no string (key or value) that is not valid Unicode. Errors name the top-level field."""
    stack: list[tuple[Any, int, str | None]] = [(body, 0, None)]
    while stack:
        node, depth, field = stack.pop()
        if isinstance(node, str):
            if not _valid_unicode(node):
                where = field or "body"
                raise _invalid(f"{where}: a string with a lone surrogate (\\ud800-\\udfff "
                               "escape not part of a pair) is not valid Unicode", field)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth >= max_depth:
            where = field or "body"
            raise _invalid(f"{where}: nested deeper than {max_depth} levels", field)
        if isinstance(node, dict):
            for key, value in node.items():
                top = field if field is not None else key
                if not _valid_unicode(key):
                    raise _invalid(f"{field or 'body'}: a key with a lone surrogate is not "
                                   "valid Unicode", field)
                stack.append((value, depth + 1, top))
        else:
            stack.extend((x, depth + 1, field) for x in node)


def _valid_unicode(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(data: bytes) -> dict[str, Any]:
    """`data` as a JSON object; a 400 (code `invalid_json`) for anything else."""
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise _invalid(f"body: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: also a >4300-digit number
        raise _invalid(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    check_tree(body)
    return body


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read up to `limit` bytes (413 beyond, chunked or not)."""
    too_big = APIError(413, f"request body larger than {limit} bytes (--max-body-bytes)",
                       code="body_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    data, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        data += chunk
    return parse_json(bytes(data))
