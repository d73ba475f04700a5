"""The engine interface of the shared Power-SMC loop (`methods.smc`), and its adapter for every
backend that returns next-token log-probabilities (`LanguageModel`).

Algorithm 1 is written once, in `methods.smc`, against `ParticleEngine`: an engine holds the
live particles of P prompts x N rows, draws one token per live row from the proposal
(`advance`), and applies ancestor indices (`reorder`). The loop keeps the weights, ESS,
resampling decisions, alpha-bridge, evidence and diagnostics. `LMParticles` serves the
Transformers, llama.cpp and toy backends by sampling from their log-probs; an engine that samples
tokens itself (vLLM) implements the interface natively.

Per step an engine reports, for every live row (`Draw`): the token, log p(token | prefix) under
the (possibly truncated) model, the incremental log-weight alpha_t log p - log q (eq. 8), and
log Z_t = log sum_v p(v | prefix)^alpha_t (eq. 11/13), which under the default proposal
(tau = 1/alpha_t, Theorem 1) equals the incremental weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.profiler import record_function

from powersmc.backends.protocol import LanguageModel
from powersmc.proposals import Proposal, sample_tempered, truncate_logprobs
from powersmc.weights import log_power_normalizer


@dataclass
class Draw:
    """One token per live row, with what the loop needs to weight it (float64, on the device)."""

    tokens: torch.Tensor  # int64 [rows]
    logp: torch.Tensor  # log p(token | prefix) under the target's model
    incr: torch.Tensor  # alpha_t log p - log q (eq. 8)
    log_z: torch.Tensor  # log sum_v p(v | prefix)^alpha_t (eq. 13 diagnostic)


@runtime_checkable
class ParticleEngine(Protocol):
    """Live particles of P prompts x N rows (prompt-major), advanced one token at a time."""

    device: torch.device
    fork_block: int  # a copy made when a row's length is 1 mod this costs no recomputation

    @property
    def adaptable(self) -> bool:
        """Whether the incremental weight depends on the prefix only (the default proposal), so
        the fully adapted order (`redraw`) is exact."""
        ...

    def start(self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int,
              redraws: bool = False) -> None:
        """Take P prompts, `rows` particles each, nothing generated yet. `budget` bounds the
        tokens all rows will generate together (for engines with a fixed-size cache).
        `redraws`: the loop may call `redraw` (the fully adapted order), so an engine that
        cannot draw after the fact (vLLM) draws the spare tokens with every step."""
        ...

    def advance(self, alpha_t: float) -> Draw:
        """Draw the next token of every live row from the proposal at exponent alpha_t and
        append it to the row."""
        ...

    def redraw(self, rows: torch.Tensor) -> Draw:
        """Fresh draws for the given live rows (int64 indices, repeats allowed), each
        independent of every other draw, from the proposal of the last `advance` given the same
        prefix (the row's tokens before its last). Changes nothing; `reorder(..., last=...)`
        installs them. Only for `adaptable` engines."""
        ...

    def reorder(self, index: torch.Tensor, last: torch.Tensor | None = None) -> None:
        """Row k becomes a copy of old row index[k] (int64; rows may be dropped or repeated).
        With `last`, row k's newest token is last[k] instead of the copied row's."""
        ...

    def close(self) -> None:
        """Release the engine's state for these particles."""
        ...


class LMParticles:
    """`ParticleEngine` over a `LanguageModel`: tokens are drawn here, from its log-probs.

    The forward pass of a step's tokens runs lazily at the next `advance`, after the loop has
    applied its ancestor indices, so each step costs one batched forward over the rows that
    survive it (finished particles have left the batch, App. D).

    Proposal: q = p^{1/tau} / Z with tau = 1/alpha_t by default (Theorem 1), a fixed `tau`, or
    any prefix-only `proposal`; `top_k` / `top_p` truncate the model itself (the target).
    """

    def __init__(self, model: LanguageModel, generator: torch.Generator, *,
                 tau: float | None = None, proposal: Proposal | None = None,
                 top_k: int | None = None, top_p: float | None = None) -> None:
        self.model, self.gen = model, generator
        self.tau, self.proposal, self.top_k, self.top_p = tau, proposal, top_k, top_p
        self.device = model.device
        self.truncating = top_k is not None or (top_p is not None and top_p < 1.0)
        self.state: Any = None
        self.logp: torch.Tensor | None = None  # next-token log p of the rows, if computed
        self.pending: torch.Tensor | None = None  # tokens drawn but not yet fed to the model
        self.alpha_t = 1.0
        self.fork_block = 1  # rows are copied with their cache, at any length

    @property
    def adaptable(self) -> bool:
        return self.tau is None and self.proposal is None

    def start(self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int,
              redraws: bool = False) -> None:
        """`redraws` needs nothing here: `redraw` samples from the kept log-probs."""
        self.state, logp = self.model.prefill_many(prompts, rows, budget=budget)
        self.logp = self._target(logp)
        self.pending = None

    def advance(self, alpha_t: float) -> Draw:
        if self.pending is not None:
            with record_function("powersmc.forward"):
                self.logp = self._target(self.model.step(self.state, self.pending))
        self.alpha_t = alpha_t
        with record_function("powersmc.sample"):
            draw = self._draw(self._current("advance"))
        self.pending = draw.tokens
        return draw

    def redraw(self, rows: torch.Tensor) -> Draw:
        return self._draw(self._current("redraw")[rows])

    def reorder(self, index: torch.Tensor, last: torch.Tensor | None = None) -> None:
        if self.pending is None:
            raise RuntimeError("LMParticles.reorder before the first advance")
        n = self.pending.shape[0]
        if index.shape[0] != n or not torch.equal(index, torch.arange(n, device=index.device)):
            self.model.reorder(self.state, index)
            self.pending = self.pending[index]
            self.logp = None  # recomputed by the next forward
        if last is not None:
            self.pending = last

    def close(self) -> None:
        self.state = self.logp = self.pending = None

    def _current(self, caller: str) -> torch.Tensor:
        """The rows' next-token log p (computed by `start` or `advance`; a reorder drops it)."""
        if self.logp is None:
            raise RuntimeError(f"LMParticles.{caller}: no log-probs (start first; after a "
                               "reorder, advance)")
        return self.logp

    def _target(self, logp: torch.Tensor) -> torch.Tensor:
        return truncate_logprobs(logp, self.top_k, self.top_p) if self.truncating else logp

    def _draw(self, logp: torch.Tensor) -> Draw:
        """Tokens from the proposal and their weights. Under the default proposal the weight
        alpha_t lp - lq IS log Z_t, computed in the same pass as the draw (eq. 13)."""
        a = self.alpha_t
        if self.proposal is None:
            inv_tau = a if self.tau is None else 1.0 / self.tau
            tok, log_norm = sample_tempered(logp, inv_tau, self.gen)
            lp = logp.gather(1, tok[:, None]).squeeze(1).double()
            if self.tau is None:
                return Draw(tok, lp, log_norm, log_norm)
            incr = a * lp - (inv_tau * lp - log_norm)
        else:
            logq = self.proposal(logp, a)
            tok, _ = sample_tempered(logq, 1.0, self.gen)
            lp = logp.gather(1, tok[:, None]).squeeze(1).double()
            incr = a * lp - logq.gather(1, tok[:, None]).squeeze(1).double()
        return Draw(tok, lp, incr, log_power_normalizer(logp, a))


def particle_engine(model: Any, generator: torch.Generator, **proposal: Any) -> ParticleEngine:
    """The engine the shared loop drives for `model`: its own (`model.particle_engine`, e.g.
    vLLM) or `LMParticles` over its log-probs. `proposal`: tau, proposal, top_k, top_p."""
    native = getattr(model, "particle_engine", None)
    return native(generator, **proposal) if native is not None else LMParticles(
        model, generator, **proposal)
