"""What a backend's own decode loop shares with the baselines: the token rule, the rows it
returns and the `Decoder` protocol ("start a prompt, then sample continuations of it or of a
kept prefix at temperature tau").

`methods.rollout` builds the generic loop (`LMDecoder`, `rollout`) on these; an engine that
samples itself (vLLM: `backends.vllm_decoder`) implements `Decoder` directly. Here, below the
methods, so that backends never import upward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from powersmc.results import Cost

# (logp [rows, V], generator, greedy) -> (tokens, log p of each, log q of each); log p is the
# model's (normalized over the full vocabulary), log q the proposal's that drew the token.
TokenRule = Callable[[torch.Tensor, torch.Generator | None, bool],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TemperatureRule:
    """Sample at temperature tau from the full model, or from its top-k / top-p nucleus after
    the temperature (then only a proposal: log p stays the full model's).

    Greedy takes the argmax (the same token at every temperature)."""

    tau: float
    top_k: int | None = None
    top_p: float | None = None

    @property
    def truncating(self) -> bool:
        return bool(self.top_k) or (self.top_p is not None and self.top_p < 1)

    def __call__(self, logp: torch.Tensor, gen: torch.Generator | None,
                 greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from powersmc.proposals import NucleusProposal, sample_tempered

        tau = self.tau
        if self.truncating or greedy:
            logq = NucleusProposal(tau, self.top_k, self.top_p)(logp, 1.0)
            tok = logq.argmax(-1) if greedy else sample_tempered(logq, 1.0, gen)[0]
            lq = logq.gather(1, tok[:, None]).squeeze(1).double()
            return tok, logp.gather(1, tok[:, None]).squeeze(1).double(), lq
        tok, log_norm = sample_tempered(logp, 1.0 / tau, gen)  # one fused pass (eq. 3)
        lp = logp.gather(1, tok[:, None]).squeeze(1).double()
        return tok, lp, lp / tau - log_norm


@dataclass
class Rollout:
    """Per row: sampled tokens, their log p and log q, length, and whether EOS was emitted.

    `state` holds every row's prompt and tokens except each row's last sampled token, which was
    not fed (feed it with `model.step` to continue). Only meaningful for rows=1 callers when
    rows finish at different times, since finished rows are dropped from it. It is the
    `source` of a later `Decoder.sample` (None where the engine keeps prefixes itself: vLLM).
    """

    tokens: torch.Tensor
    logp: torch.Tensor
    logq: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    state: Any

    def sequences(self) -> list[list[int]]:
        """Each row's sampled ids, cut at its length (EOS included when emitted)."""
        lens, rows = self.lengths.tolist(), self.tokens.tolist()
        return [row[:n] for row, n in zip(rows, lens, strict=True)]


class Decoder(Protocol):
    """Continuations of one prompt, sampled at a temperature (the baselines' view of a backend).

    `start` takes the prompt (computed once); `sample` draws `rows` continuations of the
    prompt followed by `prefix` (generated tokens kept from an earlier `Rollout`, whose `state`
    is passed as `source`), each up to `max_tokens` tokens or an EOS id. Costs are added to
    `cost` as the backend computes them (Sec. 6.1 token-evals)."""

    device: torch.device

    def start(self, prompt_ids: Sequence[int], rows: int, *, budget: int, cost: Cost) -> None:
        """Take the prompt; `rows`: the rows the first `sample` without a prefix will draw;
        `budget`: tokens all samples of this prompt may hold at once (sizes fixed caches)."""
        ...

    def sample(self, rows: int, max_tokens: int, rule: TemperatureRule,
               generator: torch.Generator | None, cost: Cost, *, prefix: Sequence[int] = (),
               source: Any = None, consume: bool = False, greedy: bool = False) -> Rollout:
        """`rows` continuations of prompt + prefix by `rule`. `source`: the `Rollout.state`
        `prefix` came from (it holds the prompt and at least prefix[:-1]); `consume`: the
        caller gives `source` up, and it holds exactly prefix[:-1], so it may be advanced in
        place (with no prefix: the prompt's own state is consumed)."""
        ...
