"""Unbiased resampling schemes (paper App. E): pure functions from normalized weights to ancestors.

Each function takes normalized weights `w` of shape [N], or [B, N] for B independent particle
systems (several prompts in one batch), and a `torch.Generator`, and returns ancestor indices A
of the same shape (int64, on w's device, indices into the last dimension) such that
E[#{k : A_k = i}] = N * w_i within each system. The ancestors of each system are sorted.
References: Douc, Cappe & Moulines (2005), "Comparison of resampling schemes for particle
filtering"; Johansen (2009), the tutorial cited in the paper.

Numerics: cumulative sums are scaled by their own last entry, so float round-off can never
leave a position beyond the end, and `searchsorted(..., right=True)` never selects a
zero-weight particle (its cumulative sum equals its predecessor's).

`chopthin` (module `powersmc.chopthin`) is the one scheme whose output is not equally
weighted: it returns (ancestors, new log-weights), and the SMC loop sets the resampled
particles' log-weights from it instead of resetting them to zero (`WEIGHTED_RESAMPLERS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from powersmc.chopthin import chopthin
from powersmc.errors import InputError

Resampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
# (normalised weights, generator) -> (ancestors, log(N * new normalised-scale weights))
WeightedResampler = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _rows(w: torch.Tensor) -> torch.Tensor:
    """View w as [B, N]; reject anything that is not one or several non-empty weight vectors."""
    if w.dim() not in (1, 2) or w.numel() == 0:
        raise ValueError("weights must be a non-empty tensor of shape [N] or [B, N]")
    return w.reshape(-1, w.shape[-1])


def _inverse_cdf(w: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A_i = min{j : sum_{k<=j} w_k > u_i} for sorted positions u_i in [0, 1), row by row."""
    cdf = torch.cumsum(w, -1)
    idx = torch.searchsorted(cdf, (positions * cdf[:, -1:]).contiguous(), right=True)
    return idx.clamp_(max=w.shape[-1] - 1)


def _uniform(shape: tuple[int, ...], w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=w.device, dtype=w.dtype)


def _grid(w: torch.Tensor) -> torch.Tensor:
    return torch.arange(w.shape[-1], device=w.device, dtype=w.dtype)


def systematic(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling: one U ~ Unif(0,1), positions (U + i)/N (Algorithm 1, line 18)."""
    rows = _rows(w)
    b, n = rows.shape
    positions = (_uniform((b, 1), rows, generator) + _grid(rows)) / n
    return _inverse_cdf(rows, positions).view(w.shape)


def stratified(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stratified resampling: one independent uniform in each stratum [i/N, (i+1)/N)."""
    rows = _rows(w)
    b, n = rows.shape
    positions = (_uniform((b, n), rows, generator) + _grid(rows)) / n
    return _inverse_cdf(rows, positions).view(w.shape)


def multinomial(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Multinomial resampling: N i.i.d. draws from Categorical(w)."""
    rows = _rows(w)
    positions, _ = torch.sort(_uniform(tuple(rows.shape), rows, generator), dim=-1)
    return _inverse_cdf(rows, positions).view(w.shape)


def residual(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Residual resampling: floor(N w_i) fixed copies, the rest multinomial on the residue.

    Row b draws R_b = N - sum_i floor(N w_bi) residual ancestors; the row's counts (fixed plus
    drawn) are then expanded into N sorted ancestors.
    """
    rows = _rows(w)
    b, n = rows.shape
    counts = torch.floor(n * rows).long()
    rest = n - counts.sum(-1, keepdim=True)  # R_b in [0, N)
    residue = (n * rows - counts.to(rows.dtype)).clamp_(min=0)
    # R_b i.i.d. uniforms per row (the other slots pushed past 1), sorted.
    u = _uniform((b, n), rows, generator)
    u = torch.where(torch.arange(n, device=rows.device) < rest, u, torch.full_like(u, 2.0))
    positions, _ = torch.sort(u, dim=-1)
    valid = positions < 1.0
    picks = _inverse_cdf(residue, torch.where(valid, positions, torch.zeros_like(positions)))
    counts.scatter_add_(1, picks, valid.long())
    flat = torch.repeat_interleave(torch.arange(n, device=rows.device).repeat(b), counts.view(-1))
    return flat.view(w.shape)


RESAMPLERS: dict[str, Resampler] = {
    "systematic": systematic,
    "multinomial": multinomial,
    "stratified": stratified,
    "residual": residual,
}
WEIGHTED_RESAMPLERS: dict[str, WeightedResampler] = {"chopthin": chopthin}


def get_resampler(name: str) -> Resampler | WeightedResampler:
    """Look up a resampling scheme by name (a `WeightedResampler` for 'chopthin')."""
    found = RESAMPLERS.get(name) or WEIGHTED_RESAMPLERS.get(name)
    if found is None:
        names = ", ".join([*RESAMPLERS, *WEIGHTED_RESAMPLERS])
        raise InputError("resampler", f"one of {names}", name)
    return found
