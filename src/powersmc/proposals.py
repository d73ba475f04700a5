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
from powersmc.weights import FLOOR

Proposal = Callable[[torch.Tensor, float], torch.Tensor]
_BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw


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


@dataclass(frozen=True)
class NucleusProposal:
    """q_t = the top-k / top-p nucleus of p_t^(1/tau), renormalised: plain sampling with the
    OpenAI controls (temperature first, then top-k, then top-p; ties at the k-th value are
    kept, so greedy decoding is `ArgmaxProposal`).

    Its support is smaller than p's, so weights against a power of the full model are not
    proper; it is for systems that never resample (`ess_threshold=0`), whose particles are
    then independent draws of this sampler (the server's plain and greedy requests).
    """

    tau: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __call__(self, logp: torch.Tensor, alpha_t: float) -> torch.Tensor:
        return truncate_logprobs(torch.log_softmax(logp / self.tau, dim=-1), self.top_k,
                                 self.top_p)


@dataclass(frozen=True)
class ArgmaxProposal:
    """q_t puts all its mass on argmax p_t (the first such token on ties, as `torch.argmax`):
    greedy decoding, for systems that never resample (see `NucleusProposal`)."""

    def __call__(self, logp: torch.Tensor, alpha_t: float) -> torch.Tensor:
        out = torch.full_like(logp, float("-inf"))
        return out.scatter_(-1, logp.argmax(-1, keepdim=True), 0.0)


def sample_tempered(
    logp: torch.Tensor, inv_tau: float | torch.Tensor,
    generator: torch.Generator | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from q(v) proportional to exp(inv_tau * logp(v)) (eq. 3) and
    return (tokens [n], log_norm [n] float64), log_norm = log sum_v exp(inv_tau * logp(v)).

    With inv_tau = alpha_t and normalized logp, log_norm is log Z_t(alpha_t) = log sum_v
    p_t(v)^alpha_t (eq. 11), which under the optimal proposal of Theorem 1 IS the incremental
    log-weight alpha_t log p - log q (eq. 8), whatever token is drawn; in general
    log q(tok) = inv_tau * logp(tok) - log_norm.

    One fused pass instead of softmax + exp + multinomial: the unnormalized probabilities
    exp(inv_tau * logp - max) are summed in float64 per block of 256 tokens; a uniform picks a
    block by the float64 cumulative block sums, then a token inside it. Exact inverse-CDF
    sampling of the float32 probabilities; about 10x faster than `torch.multinomial` over a
    49k vocabulary on CPU. A row of logp must hold at least one finite value.

    Terms below e^FLOOR = e^-80 of the largest are raised to it before the exp: with alpha * log p
    spanning hundreds of nats, most terms would otherwise be subnormal floats, 5-10x slower on
    CPU (`weights.logsumexp_rows`). This changes log_norm by under 1e-29 relative and the draw
    not at all: such a token (or a truncated one, p = 0) holds less than the float64 uniform's
    resolution (2^-53 of the total), so the cumulative sums never step over it.

    `inv_tau` may be one value per row (a tensor [n]); `generator` may be the draw's float64
    uniforms [n] themselves (drawn by the caller, e.g. from each row's own generator): a
    generator yields exactly `torch.rand(n, dtype=float64)` from it.
    """
    rows, vocab = logp.shape
    padded = -(-vocab // _BLOCK) * _BLOCK
    s = logp * (inv_tau.to(logp.dtype)[:, None] if isinstance(inv_tau, torch.Tensor) else inv_tau)
    top = s.amax(-1, keepdim=True)
    s.sub_(top).clamp_(min=FLOOR).exp_()  # no subnormals (see the docstring)
    if padded != vocab:
        s = torch.nn.functional.pad(s, (0, padded - vocab), value=0.0)
    blocks = s.view(rows, -1, _BLOCK)
    cum = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [rows, blocks]
    total = cum[:, -1:]
    if isinstance(generator, torch.Tensor):
        u = generator.to(logp.device, torch.float64).view(rows, 1)
    else:
        u = torch.rand((rows, 1), generator=generator, dtype=torch.float64, device=logp.device)
    u = (1.0 - u) * total  # uniform on (0, total]
    b = torch.searchsorted(cum, u).clamp_max(cum.shape[1] - 1)
    below = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(u))
    inner = blocks[torch.arange(rows, device=logp.device), b.squeeze(1)].double().cumsum(-1)
    j = torch.searchsorted(inner, torch.minimum(u - below, inner[:, -1:]))  # rounding-safe
    return (b * _BLOCK + j).squeeze(1), total.squeeze(1).log() + top.squeeze(1).double()


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
    truncating = check_nucleus(top_k, top_p)
    if truncating:
        warnings.warn(
            "top_k/top_p truncate the model: the sampler then targets p_trunc(y)^alpha, the power "
            "of the truncated model, not of the full model",
            TruncatedTargetWarning,
            stacklevel=3,
        )
    return truncating


def check_nucleus(top_k: int | None, top_p: float | None) -> bool:
    """Validate top-k / top-p; returns True if they restrict the vocabulary."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError("top_k", "a positive integer, or None for the full vocabulary", top_k)
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise InputError("top_p", "a number in (0, 1], or None for the full vocabulary", top_p)
    return top_k is not None or (top_p is not None and top_p < 1.0)
