"""Request bodies, as strict pydantic models: unknown fields and wrong types are rejected.

The OpenAI fields clients send are declared with their OpenAI types; those this server cannot
honour (logprobs, penalties, echo, ...) are accepted only at their neutral value (checked in
`jobs.py`), so default payloads of the `openai` client, LangChain or lm-eval pass. The
power-sampling options are extra body fields (`extra_body=` in the `openai` client).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, create_model, field_validator

from powersmc.server.config import SERVED

_STRICT = ConfigDict(extra="forbid", strict=True)
MAX_SEED = (1 << 63) - 1  # torch generators take a signed 64-bit seed
SEED_RANGE = "an integer in [0, 2^63 - 1]"


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class _Power(BaseModel):
    """Power-sampling options; None means the server's default (set on its command line)."""

    model_config = _STRICT
    method: str | None = None
    alpha: float | None = None
    top_k: int | None = None  # plain sampling's (checked in `jobs`)


# every served method option of `methods.options`, typed as declared there
if TYPE_CHECKING:
    PowerOptions = _Power
else:
    PowerOptions = create_model("PowerOptions", __base__=_Power,
                                **{o.name: (o.kind | None, None) for o in SERVED})


class _OpenAIFields(PowerOptions):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    timeout: float | None = None  # seconds; capped by the server's --request-timeout
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int | None) -> int | None:
        """A seed the generators can take: out of range is a 400 naming `seed`, not a failed
        batch (torch's 'Overflow when unpacking long long')."""
        if seed is not None and not 0 <= seed <= MAX_SEED:
            got = str(seed) if seed.bit_length() < 128 else f"a {seed.bit_length()}-bit integer"
            raise ValueError(f"{SEED_RANGE} (got {got})")
        return seed


class CompletionRequest(_OpenAIFields):
    """POST /v1/completions: raw text (or token ids), no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_OpenAIFields):
    """POST /v1/chat/completions: messages, rendered by the backend's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def field_names() -> set[str]:
    """Every field name of every request model (to tell fields from union type tags)."""
    models = (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions)
    return {name for m in models for name in m.model_fields}
