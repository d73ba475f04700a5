"""The model protocol the scheduler's engine (`backends.particles.LMParticles`) is written
against: prefill / extend / step / reorder, and the capabilities it plans with.

A backend owns model state for a batch of rows that share one prompt (`prefill`) or that hold
several prompts, `rows` rows each, prompt-major (`prefill_many`). Rows are anonymous:
the samplers keep their own mapping from particles to rows, so finished particles can leave the
batch (`reorder` with fewer rows) and resampled ones can be duplicated (`reorder` with repeats).
All returned log-probabilities are float32 tensors of shape [rows, vocab_size], normalized over
the full vocabulary, on `device`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

Prompt = str | Sequence[int]
# Tokens that end a turn or a document in common chat models; every text backend adds those
# its vocabulary has to the EOS set, so backends reading the same model share one target.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@runtime_checkable
class LanguageModel(Protocol):
    """A causal LM seen as: next-token log-probabilities given a prefix, with batched state."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: torch.device
    max_context: int | None
    max_rows: int | None  # the most rows a state holds at once (None: no limit)
    joins_running: bool  # `extend` can add rows to a running state

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Prompt ids: text goes through the tokenizer (and chat template); ids pass through."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids (EOS ids dropped). Called once per result, never per step."""
        ...

    def prefill(self, prompt_ids: Sequence[int], rows: int, *,
                budget: int | None = None) -> tuple[Any, torch.Tensor]:
        """Process the prompt once and share it across `rows` rows; return (state, logprobs).

        budget: an upper bound on the tokens this state and its forks will hold beyond the
        prompt, all rows together; backends with a fixed-size cache size it from this."""
        ...

    def prefill_many(
        self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int | None = None,
        room: tuple[int, int] | None = None,
    ) -> tuple[Any, torch.Tensor]:
        """Several prompts in one state: rows p*rows .. p*rows+rows-1 continue prompt p.
        Every row's next-token logprobs equal those of `prefill` on its own prompt. room:
        (rows, length) the state should be able to hold at once after later `extend`s, rows
        of at most `length` tokens (a hint for a fixed-size cache)."""
        ...

    def extend(self, state: Any, prompts: Sequence[Sequence[int]], rows: int, *,
               budget: int | None = None) -> torch.Tensor:
        """Add `rows` rows per prompt after the state's rows (prompt-major), nothing
        generated yet; return their next-token logprobs. Only where `joins_running`."""
        ...

    def fits(self, state: Any, rows: int, length: int) -> bool:
        """Whether `extend` can add `rows` rows of at most `length` tokens each (prompt
        included) to the state beside its rows (always, where the cache grows as needed)."""
        ...

    def cells_in_use(self, state: Any) -> int | None:
        """KV cells the state holds (None: not counted)."""
        ...

    def step(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (int64 [rows]); return next-token logprobs [rows, V]."""
        ...

    def reorder(self, state: Any, index: torch.Tensor) -> None:
        """Make row k a copy of old row index[k]; len(index) may differ from the row count."""
        ...

