"""Unbiased resampling schemes (paper App. E): pure functions from normalized weights to ancestors.

Each function takes normalized weights `w` of shape [N] (float64 recommended) and a
`torch.Generator`, and returns ancestor indices A of shape [N] (int64, on w's device) such
that E[#{k : A_k = i}] = N * w_i. References: Douc, Cappe & Moulines (2005), "Comparison of
resampling schemes for particle filtering"; Johansen (2009), the tutorial cited in the paper.

Numerics: cumulative sums are scaled by their own last entry, so float round-off can never
leave a position beyond the end, and `searchsorted(..., right=True)` never selects a
zero-weight particle (its cumulative sum equals its predecessor's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from powersmc.errors import InputError

Resampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _check(w: torch.Tensor) -> None:
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError("weights must be a non-empty 1-D tensor")


def _inverse_cdf(w: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A_i = min{j : sum_{k<=j} w_k > u_i} for sorted positions u_i in [0, 1)."""
    cdf = torch.cumsum(w, 0)
    idx = torch.searchsorted(cdf, positions * cdf[-1], right=True)
    return idx.clamp_(max=w.numel() - 1)


def _uniform(n: int, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=w.device, dtype=w.dtype)


def systematic(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling: one U ~ Unif(0,1), positions (U + i)/N (Algorithm 1, line 18)."""
    _check(w)
    n = w.numel()
    u = _uniform(1, w, generator)
    positions = (u + torch.arange(n, device=w.device, dtype=w.dtype)) / n
    return _inverse_cdf(w, positions)


def stratified(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stratified resampling: one independent uniform in each stratum [i/N, (i+1)/N)."""
    _check(w)
    n = w.numel()
    positions = (_uniform(n, w, generator) + torch.arange(n, device=w.device, dtype=w.dtype)) / n
    return _inverse_cdf(w, positions)


def multinomial(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Multinomial resampling: N i.i.d. draws from Categorical(w)."""
    _check(w)
    n = w.numel()
    positions, _ = torch.sort(_uniform(n, w, generator))
    return _inverse_cdf(w, positions)


def residual(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Residual resampling: floor(N w_i) fixed copies, the rest multinomial on the residue."""
    _check(w)
    n = w.numel()
    counts = torch.floor(n * w).long()
    ancestors = torch.repeat_interleave(torch.arange(n, device=w.device), counts)
    rest = n - ancestors.numel()
    if rest > 0:
        residue = (n * w - counts.to(w.dtype)).clamp_(min=0)
        positions, _ = torch.sort(_uniform(rest, w, generator))
        ancestors = torch.cat([ancestors, _inverse_cdf(residue, positions)])
    return ancestors


RESAMPLERS: dict[str, Resampler] = {
    "systematic": systematic,
    "multinomial": multinomial,
    "stratified": stratified,
    "residual": residual,
}


def get_resampler(name: str) -> Resampler:
    """Look up a resampling scheme by name."""
    try:
        return RESAMPLERS[name]
    except KeyError:
        raise InputError("resampler", f"one of {', '.join(RESAMPLERS)}", name) from None
