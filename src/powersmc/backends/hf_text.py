"""Prompt encoding and the EOS set of a Hugging Face tokenizer, shared by every backend that
reads one (Transformers, vLLM), so backends reading the same model share one target."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from powersmc.backends.protocol import END_TOKENS


def eos_ids(sources: Iterable[Any], tokenizer: Any, vocab_size: int) -> tuple[int, ...]:
    """The ids in `sources` (each an id, a list of ids or None: generation config, model config,
    tokenizer) plus the usual end-of-turn tokens of the vocabulary, within [0, vocab_size)."""
    ids: set[int] = set()
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return tuple(sorted(i for i in ids if 0 <= i < vocab_size))


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int], chat: bool,
                  system_prompt: str | None) -> list[int]:
    """Prompt ids: ids pass through; text is tokenized raw, or as one user turn (after the
    system prompt, if any) through the chat template."""
    if not isinstance(prompt, str):
        return [int(i) for i in prompt]
    if not chat:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return encode_chat(tokenizer, messages)


def encode_chat(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Prompt ids of a chat through the tokenizer's template, with the generation prompt."""
    enc = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
