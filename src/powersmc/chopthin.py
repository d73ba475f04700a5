"""Chopthin resampling (Gandy & Lau 2016, "The chopthin algorithm for resampling", IEEE TSP).

Unlike the schemes of `resampling` (paper App. E), chopthin does not return equally weighted
particles. It only bounds the ratio of the largest to the smallest weight by eta: particles
lighter than a threshold a are *thinned* (kept with probability ~ w/a, then weighing ~ a),
particles heavier than b = a*eta/2 are *chopped* into k ~ w/b copies of weight w/k each, and
the ones in between are kept once as they are. The threshold solves sum_i h_a(w_i) = N for
h_a(w) = w/a (w < a), 1 (a <= w <= b), w/b (w > b), so exactly N particles come out.

Unbiasedness (what SMC needs, eq. 5 and the evidence): with the returned weights W'_j,
E[sum_j W'_j f(x_{A_j})] = sum_i w_i f(x_i) for every f. Chopped and kept particles carry
exactly their own weight (sum over copies = w_i, at least one copy always); a thinned particle
kept with probability pi_i carries w_i / pi_i. The weights are NOT renormalised afterwards:
renormalising by their random total would bias the SMC evidence estimate.

With eta >= 4 the output weights lie within a ratio eta of each other (chopped copies weigh
between b/2 >= a and 2b = eta*a); eta = 3 + 2 sqrt 2 (the default) guarantees
ESS >= N/2 after resampling, i.e. no immediate re-trigger at the paper's kappa = 0.5.

This implementation: the threshold is found exactly among the 2N breakpoints {w_i, 2w_i/eta}
(h is continuous, decreasing and of the form c + K/a between breakpoints), all on the device
for [B, N] weights (B independent particle systems). The integer parts floor(h_i) of the kept
and chopped particles are deterministic; the remaining R = N - sum floor(h) copies are placed
by systematic sampling over the fractional parts, so every count is floor(h_i) or that plus
one and the heaviest particle always survives.
"""

from __future__ import annotations

import math

import torch

ETA = 3.0 + 2.0 * math.sqrt(2.0)  # smallest ratio bound that guarantees ESS >= N/2


def _classify(w: torch.Tensor, a: torch.Tensor, eta: float):
    """Masks (thinned, chopped) of weights w [..., N] for thresholds a [..., 1]."""
    return w < a, w > a * (eta / 2.0)


def _h_sum(w: torch.Tensor, a: torch.Tensor, eta: float) -> torch.Tensor:
    """sum_i h_a(w_i) for every threshold in a [B, K] (w: [B, N]); +inf where a <= 0."""
    ww, aa = w[:, None, :], a[:, :, None]
    thin, chop = _classify(ww, aa, eta)
    safe = torch.where(aa > 0, aa, torch.ones_like(aa))
    h = torch.where(thin, ww / safe, torch.where(chop, ww / (safe * (eta / 2.0)), 1.0))
    return torch.where(a > 0, h.sum(-1), torch.full_like(a, math.inf))


def threshold(w: torch.Tensor, n: int, eta: float = ETA) -> torch.Tensor:
    """The chopthin threshold a [B, 1] with sum_i h_a(w_i) = n for normalised weights w [B, N]."""
    cand, _ = torch.sort(torch.cat([w, w * (2.0 / eta)], -1), dim=-1)  # [B, 2N]
    h = _h_sum(w, cand, eta)  # decreasing along the sorted candidates
    lo = ((h >= n).sum(-1, keepdim=True) - 1).clamp_(min=0)
    hi = (lo + 1).clamp_(max=cand.shape[-1] - 1)
    a_lo, a_hi = cand.gather(-1, lo), cand.gather(-1, hi)
    mid = 0.5 * (a_lo + a_hi)  # the classification is constant on (a_lo, a_hi)
    thin, chop = _classify(w, mid, eta)
    middle = (~thin & ~chop).sum(-1, keepdim=True).to(w.dtype)
    k = (w * thin).sum(-1, keepdim=True) + (w * chop).sum(-1, keepdim=True) * (2.0 / eta)
    solved = k / (n - middle).clamp(min=1e-300)
    a = torch.where(n - middle > 0.5, solved, mid)
    return torch.minimum(torch.maximum(a, a_lo), a_hi)


def chopthin(w: torch.Tensor, generator: torch.Generator,
             eta: float = ETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Chopthin resampling of normalised weights w ([N] or [B, N]).

    Returns (ancestors, log_weights), both of w's shape: sorted ancestor indices per system
    and the new log-weights log(N * W'_j), whose exp has expectation-preserving sums
    (E[sum_j W'_j 1{A_j = i}] = w_i); equal input weights come back unchanged with log-weight 0.
    """
    if not eta >= 4.0:
        raise ValueError("chopthin needs eta >= 4")
    if w.dim() not in (1, 2) or w.numel() == 0:
        raise ValueError("weights must be a non-empty tensor of shape [N] or [B, N]")
    rows = w.reshape(-1, w.shape[-1]).to(torch.float64)
    b, n = rows.shape
    a = threshold(rows, n, eta)
    thin, chop = _classify(rows, a, eta)
    h = torch.where(thin, rows / a, torch.where(chop, rows / (a * (eta / 2.0)), 1.0))
    fixed = torch.where(thin, 0.0, torch.floor(h).clamp(min=1.0))  # >= 1 copy unless thinned
    frac = (h - fixed).clamp(min=0.0)
    rest = (n - fixed.sum(-1, keepdim=True)).clamp(min=0.0)  # R_b, an integer in [0, N]
    # systematic sampling of R_b extra copies over the fractional parts
    cdf = torch.cumsum(frac, -1)
    total = cdf[:, -1:]
    grid = torch.arange(n, device=rows.device, dtype=rows.dtype)
    u = torch.rand((b, 1), generator=generator, device=rows.device, dtype=rows.dtype)
    valid = grid < rest
    pos = torch.where(valid, (u + grid) / rest.clamp(min=1.0) * total, torch.zeros_like(grid))
    picks = torch.searchsorted(cdf, pos.contiguous(), right=True).clamp_(max=n - 1)
    counts = fixed.long().scatter_add_(1, picks, valid.long())
    # per-copy weights: exact share for kept / chopped particles, Horvitz-Thompson if thinned
    incl = frac * rest / torch.where(total > 0, total, torch.ones_like(total))
    thinned_w = rows / torch.where(incl > 0, incl, torch.ones_like(incl))
    share = torch.where(thin, thinned_w, rows / counts.clamp(min=1).to(rows.dtype))
    flat = torch.arange(b * n, device=rows.device)
    src = torch.repeat_interleave(flat, counts.view(-1), output_size=b * n)  # no host sync
    ancestors = (src % n).view(w.shape)
    log_w = torch.log(n * share.view(-1)[src]).view(w.shape)
    return ancestors, log_w
