"""The engine contract of the one token loop (`runtime.scheduler`): what every engine draws
per step (`Draw`), how a request's rows are drawn (`DrawSpec`), and the engine itself
(`ParticleEngine`).

Algorithm 1 is written once, in `methods.system`, against `ParticleEngine`: an engine holds the
live rows of every request in the batch, draws one token per live row from its request's
proposal (`advance`), and applies ancestor indices (`reorder`). The loop keeps the weights,
ESS, resampling decisions, alpha-bridge, evidence and diagnostics. `backends.particles.
LMParticles` serves the Transformers, llama.cpp and toy backends by sampling from their
log-probs; an engine that samples tokens itself (vLLM) implements the contract natively.

Per step an engine reports, for every live row (`Draw`): the token, log p(token | prefix) under
the (possibly truncated) model, the incremental log-weight alpha_t log p - log q (eq. 8), and
log Z_t = log sum_v p(v | prefix)^alpha_t (eq. 11/13), which under the default proposal
(tau = 1/alpha_t, Theorem 1) equals the incremental weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from powersmc.proposals import Proposal


@dataclass
class Draw:
    """One token per live row, with what the loop needs to weight it (float64, on the device)."""

    tokens: torch.Tensor  # int64 [rows]
    logp: torch.Tensor  # log p(token | prefix) under the target's model
    incr: torch.Tensor  # alpha_t log p - log q (eq. 8)
    log_z: torch.Tensor  # log sum_v p(v | prefix)^alpha_t (eq. 13 diagnostic)


@dataclass(frozen=True, eq=False)
class DrawSpec:
    """How the rows of one particle system are drawn: its own generator and proposal.

    Proposal: q = p^{1/tau} / Z with tau = 1/alpha_t by default (Theorem 1), a fixed `tau`, or
    any prefix-only `proposal`; `top_k` / `top_p` truncate the model itself (the target).
    `redraws`: the loop may call `redraw` for these rows (the fully adapted order)."""

    generator: torch.Generator
    tau: float | None = None
    proposal: Proposal | None = None
    top_k: int | None = None
    top_p: float | None = None
    redraws: bool = False

    @property
    def truncating(self) -> bool:
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)

    @property
    def adaptable(self) -> bool:
        """The incremental weight depends on the prefix only (the default proposal), so the
        fully adapted order (`redraw`) is exact."""
        return self.tau is None and self.proposal is None


@runtime_checkable
class ParticleEngine(Protocol):
    """Live rows of several requests in one batch, advanced one token at a time.

    Rows are request-major: the rows of the live requests in the order they joined, each
    request's rows contiguous. A request joins with `admit` (its rows come after the others'
    at the next `advance`) and leaves when `reorder` gives it no rows. A request is a
    Power-SMC system or a program's continuation rows: the engine only draws, from each
    request's `DrawSpec`."""

    device: torch.device
    fork_block: int  # a copy made when a row's length is 1 mod this costs no recomputation
    max_rows: int | None  # the most rows one request may have (None: no limit)
    joins_running: bool  # a request can join while others run (else only an empty batch)
    failed: dict[int, Exception]  # after `advance`: joiners (by place) whose prompt failed

    def room(self, prompt_len: int, rows: int, budget: int) -> bool:
        """Whether a request of `rows` rows, whose longest row holds `prompt_len` tokens when
        it joins (prompt and any prefix) and which generates `budget` tokens, fits beside the
        live ones now (a bounded cache); an empty engine always says yes."""
        ...

    def admit(self, prompt: Sequence[int], rows: int, spec: DrawSpec, *, budget: int,
              prefixes: Sequence[Sequence[int]] | None = None) -> None:
        """Take a new request: `rows` rows on `prompt`, nothing generated yet; with
        `prefixes` (one per row), row k starts from prompt + prefixes[k] (a particle system
        resumed after its particles moved). `budget` bounds the tokens its rows will generate
        together. Raises `InputError` for a spec the engine cannot draw."""
        ...

    def advance(self, alphas: Sequence[float]) -> Draw:
        """Draw the next token of every live row from its request's proposal at that
        request's exponent (`alphas`, one per request in row order) and append it to the row.
        A joiner whose prompt fails to evaluate is left out and listed in `failed`."""
        ...

    def logprobs(self, lo: int, hi: int) -> torch.Tensor:
        """The next-token log-probs [hi - lo, V] the last `advance` drew rows lo .. hi - 1
        from (the target's, truncated as its spec says). Raises `InputError` on an engine
        that samples without exposing them (vLLM)."""
        ...

    def redraw(self, rows: torch.Tensor) -> Draw:
        """Fresh draws for the given live rows (int64 indices, repeats allowed), each
        independent of every other draw, from the proposal of the last `advance` given the same
        prefix (the row's tokens before its last). Changes nothing; `reorder(..., last=...)`
        installs them. Only for rows of `adaptable` systems admitted with `redraws`."""
        ...

    def reorder(self, index: torch.Tensor, counts: Sequence[int],
                last: torch.Tensor | None = None) -> None:
        """Row k becomes a copy of old row index[k] (int64; rows may be dropped or repeated);
        `counts`: the rows each request (in order) has afterwards, a 0 removes the request
        and frees what it held. With `last`, row k's newest token is last[k] instead."""
        ...

    def cells_in_use(self) -> int | None:
        """KV cells the engine's states hold (llama.cpp: written and not freed, parked cells
        included); None for an engine that does not count them."""
        ...

    def close(self) -> None:
        """Release every request's state."""
        ...
