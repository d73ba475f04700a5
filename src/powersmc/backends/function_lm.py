"""`FunctionLM`: a backend built from a plain function prefix -> next-token log-probabilities.

For enumerable toy models (exactness tests) and for anyone's custom LM. The function receives
the full prefix (prompt ids followed by generated ids) as a tuple and returns log-probabilities
(or unnormalized logits, normalized here) over the vocabulary. Results are memoized per prefix,
since a deterministic function needs no recomputation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from powersmc.errors import InputError

NextTokenFn = Callable[[tuple[int, ...]], Sequence[float] | torch.Tensor]


@dataclass
class FunctionState:
    """Per-row prefixes (prompt + generated ids) and how many prompt ids each starts with."""

    prefixes: list[tuple[int, ...]]
    prompt_lens: list[int]


class FunctionLM:
    """A `LanguageModel` whose next-token distribution is `next_token_logprobs(prefix)`."""

    def __init__(
        self,
        next_token_logprobs: NextTokenFn,
        vocab_size: int,
        eos_token_ids: int | Sequence[int],
        *,
        max_context: int | None = None,
        cache_size: int = 1 << 20,
    ) -> None:
        if vocab_size < 1:
            raise InputError("vocab_size", "a positive integer", vocab_size)
        eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids)
        if any(not 0 <= e < vocab_size for e in eos):
            raise InputError("eos_token_ids", f"ids in [0, {vocab_size})", eos_token_ids)
        self.fn = next_token_logprobs
        self.vocab_size = vocab_size
        self.eos_token_ids = eos
        self.device = torch.device("cpu")
        self.max_context = max_context
        self.max_rows: int | None = None
        self.joins_running = True
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}
        self._cache_size = cache_size

    def encode_prompt(self, prompt: Sequence[int] | str) -> list[int]:
        if isinstance(prompt, str):
            raise InputError("prompt", "a list of token ids for a FunctionLM", prompt)
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise InputError("prompt", f"token ids in [0, {self.vocab_size})", list(prompt))
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in token_ids if int(i) not in self.eos_token_ids)

    def _logprobs(self, prefix: tuple[int, ...]) -> torch.Tensor:
        out = self._memo.get(prefix)
        if out is None:
            raw = torch.as_tensor(self.fn(prefix), dtype=torch.float64)
            if raw.shape != (self.vocab_size,):
                raise ValueError(
                    f"next_token_logprobs returned shape {tuple(raw.shape)}, "
                    f"expected ({self.vocab_size},)"
                )
            out = torch.log_softmax(raw, -1).float()
            if len(self._memo) >= self._cache_size:
                self._memo.clear()
            self._memo[prefix] = out
        return out

    def _batch(self, prefixes: list[tuple[int, ...]]) -> torch.Tensor:
        return torch.stack([self._logprobs(p) for p in prefixes])

    def prefill(self, prompt_ids: Sequence[int], rows: int, *,
                budget: int | None = None) -> tuple[FunctionState, torch.Tensor]:
        prompt = tuple(int(i) for i in prompt_ids)
        state = FunctionState([prompt] * rows, [len(prompt)] * rows)
        return state, self._logprobs(prompt).expand(rows, -1).clone()

    def prefill_many(
        self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int | None = None,
        room: tuple[int, int] | None = None,
    ) -> tuple[FunctionState, torch.Tensor]:
        ids = [tuple(int(i) for i in p) for p in prompts]
        state = FunctionState([p for p in ids for _ in range(rows)],
                              [len(p) for p in ids for _ in range(rows)])
        return state, self._batch(state.prefixes)

    def extend(self, state: FunctionState, prompts: Sequence[Sequence[int]], rows: int, *,
               budget: int | None = None) -> torch.Tensor:
        """Append `rows` rows per prompt to a running state (a system joining the batch);
        returns the new rows' next-token logprobs."""
        ids = [tuple(int(i) for i in p) for p in prompts]
        new = [p for p in ids for _ in range(rows)]
        state.prefixes += new
        state.prompt_lens += [len(p) for p in new]
        return self._batch(new)

    def fits(self, state: FunctionState, rows: int, length: int) -> bool:
        return True  # nothing is cached

    def cells_in_use(self, state: FunctionState) -> int | None:
        return None

    def step(self, state: FunctionState, tokens: torch.Tensor) -> torch.Tensor:
        state.prefixes = [p + (t,) for p, t in zip(state.prefixes, tokens.tolist(), strict=True)]
        return self._batch(state.prefixes)

    def reorder(self, state: FunctionState, index: torch.Tensor) -> None:
        order = index.tolist()
        state.prefixes = [state.prefixes[i] for i in order]
        state.prompt_lens = [state.prompt_lens[i] for i in order]
