"""OpenAI response bodies and server-sent-event chunks built from a `JobResult`.

Streaming: every method here returns whole answers (Power-SMC's answer is the particle drawn
at the end), so a stream carries each choice's full text in one chunk once it is ready,
then the finish chunk(s), an optional usage chunk, and `data: [DONE]`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

from powersmc.server.execute import JobResult
from powersmc.server.jobs import Job


def finite(value: Any) -> Any:
    """`value` with non-finite floats (a -inf log-weight, say) as None: JSON has no inf/NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _usage(result: JobResult) -> dict[str, int]:
    done = sum(c.completion_tokens for c in result.choices)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": done,
            "total_tokens": result.prompt_tokens + done}


def response_body(job: Job, result: JobResult, model: str) -> dict[str, Any]:
    """The non-streaming body of /v1/completions or /v1/chat/completions."""
    if job.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(result.choices)]
    else:
        choices = [{"index": i, "text": c.text, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(result.choices)]
    return {"id": _id(job), "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(result), "powersmc": finite(result.info)}


def stream_events(job: Job, result: JobResult, model: str) -> Iterator[str]:
    """The SSE lines of a streamed response (OpenAI chunk format)."""
    head = {"id": _id(job), "object": "chat.completion.chunk" if job.chat else
            "text_completion", "created": int(time.time()), "model": model}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"

    last = len(result.choices) - 1
    for i, c in enumerate(result.choices):
        # the powersmc object rides on the last finish chunk (and on the usage chunk)
        extra = {"powersmc": finite(result.info)} if i == last else {}
        if job.chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": i, "delta": {"content": c.text}, "logprobs": None,
                          "finish_reason": None}])
            yield chunk([{"index": i, "delta": {}, "logprobs": None,
                          "finish_reason": c.finish_reason}], **extra)
        else:
            yield chunk([{"index": i, "text": c.text, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": i, "text": "", "logprobs": None,
                          "finish_reason": c.finish_reason}], **extra)
    if job.include_usage:
        yield chunk([], usage=_usage(result), powersmc=finite(result.info))
    yield "data: [DONE]\n\n"


def _id(job: Job) -> str:
    return ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex

