"""Prefix-only token proposals and optional target truncation (paper Sec. 4.1, Theorem 1).

A proposal is any function `(logp, alpha_t) -> logq` mapping the model's next-token
log-probabilities [n, V] (and the exponent in force) to normalized proposal log-probabilities
[n, V]. It may depend on the prefix only through `logp`. Its support must cover the target's.

Truncation (top-k / top-p) is NOT a proposal choice: it changes the model whose power is
targeted. `truncate_logprobs` therefore rewrites log p itself into the truncated, renormalized
model; weights computed from it are exact for that truncated target, and never for the full one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from powersmc.errors import InputError

Proposal = Callable[[torch.Tensor, float], torch.Tensor]


class TruncatedTargetWarning(UserWarning):
    """Emitted when top-k / top-p is on: the sampler then targets the truncated model's power."""


@dataclass(frozen=True)
class TemperatureProposal:
    """q_t(v) proportional to p_t(v)^(1/tau) (eq. 3).

    With `tau=None` the temperature follows the exponent in force, tau = 1/alpha_t: the unique
    prefix-only proposal with zero incremental-weight variance (Theorem 1, Corollary 1, and its
    stage-wise form in App. B).
    """

    tau: float | None = None

    def __call__(self, logp: torch.Tensor, alpha_t: float) -> torch.Tensor:
        inv_tau = alpha_t if self.tau is None else 1.0 / self.tau
        return torch.log_softmax(logp * inv_tau, dim=-1)


def truncate_logprobs(
    logp: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The truncated model: keep the top-k tokens and/or the smallest nucleus of mass >= top_p,
    set the rest to -inf and renormalize. Ties at the k-th value are kept, so the result is a
    deterministic function of logp."""
    out = logp
    if top_k is not None and top_k < logp.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_lp, order = torch.sort(out, dim=-1, descending=True)
        cum = torch.cumsum(sorted_lp.exp(), dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (cum - sorted_lp.exp()) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return torch.log_softmax(out, dim=-1)


def check_truncation(top_k: int | None, top_p: float | None) -> bool:
    """Validate top-k / top-p; warn that they change the target. Returns True if truncating."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError("top_k", "a positive integer, or None for the full vocabulary", top_k)
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise InputError("top_p", "a number in (0, 1], or None for the full vocabulary", top_p)
    truncating = top_k is not None or (top_p is not None and top_p < 1.0)
    if truncating:
        warnings.warn(
            "top_k/top_p truncate the model: the sampler then targets p_trunc(y)^alpha, the power "
            "of the truncated model, not of the full model",
            TruncatedTargetWarning,
            stacklevel=3,
        )
    return truncating
