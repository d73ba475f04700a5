"""The MH arithmetic of the power samplers' local moves and swaps: pure functions on floats.

One identity serves every kernel here. With the proposal q = p^a / Z_t over the full vocabulary
(temperature 1/a; Theorem 1's proposal), a log p(y_t | y_<t) - log q(y_t | y_<t) = zeta_t(a) =
log sum_v p(v | y_<t)^a (eq. 11), whatever y_t was drawn. So a move that keeps y_<r and
regenerates the rest from q, on a state space where both sequences are scored over the same
positions (a fixed horizon, records padded after EOS with a token of probability 1), has the
Metropolis-Hastings ratio

    log R = sum_{t >= r} zeta_t(y') - sum_{t >= r} zeta_t(y)                         (mh_log_ratio)

times the ratio of the cut laws, q_cut(r | y') / q_cut(r | y), when the cut is drawn from a law
that depends on the state (the entropy cut of Zhou, Mehrotra & Liu, arXiv 2605.30327: `cut_law`).
Two replicas at exponents a < b exchange their records with the ratio
exp[(b - a)(log p(x_a) - log p(x_b))] (`swap_log_ratio`; parallel tempering, Geyer 1991;
Theodoropoulos et al., arXiv 2609.38104).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mh_log_ratio(zeta_new: Sequence[float], zeta_old: Sequence[float]) -> float:
    """log R of a suffix regeneration from the tempered proposal on a fixed horizon: the sums
    of zeta over the regenerated positions of the proposal and of the current state (each up
    to its own EOS; padding contributes 0)."""
    return math.fsum(zeta_new) - math.fsum(zeta_old)


def swap_log_ratio(a_lo: float, a_hi: float, log_p_lo: float, log_p_hi: float) -> float:
    """log of the acceptance ratio for exchanging the records of two replicas at exponents
    a_lo < a_hi whose records have log-likelihoods log_p_lo and log_p_hi: the joint target
    prod_k p(x_k)^{a_k} / Z_k after the exchange over before."""
    return (a_hi - a_lo) * (log_p_lo - log_p_hi)


def cut_law(entropy: Sequence[float], length: int, beta: float) -> list[float]:
    """The entropy cut law q_cut(i | y) over positions i = 0 .. length - 1: proportional to
    max(0, H_i - H_{i-1})^beta (H_{-1} = 0; positions past the record's end, its padding, have
    entropy 0), uniform when every weight is 0 (arXiv 2605.30327, Sec. 3). A cut lands where the
    model's uncertainty rises, where an answer forks."""
    h = list(entropy[:length]) + [0.0] * max(0, length - len(entropy))
    w = [max(0.0, h[i] - (h[i - 1] if i else 0.0)) for i in range(length)]
    w = [x**beta if x > 0 else 0.0 for x in w]
    total = math.fsum(w)
    if total <= 0 or not math.isfinite(total):
        return [1.0 / length] * length
    return [x / total for x in w]


def draw_index(probs: Sequence[float], generator: torch.Generator) -> int:
    """One index drawn from `probs` with `generator`."""
    p = torch.tensor(probs, dtype=torch.float64)
    return int(torch.multinomial(p, 1, generator=_cpu(generator)))


def accept(log_r: float, generator: torch.Generator) -> bool:
    """Metropolis-Hastings: accept with probability min(1, exp(log_r))."""
    u = float(torch.rand((), generator=generator, device=generator.device, dtype=torch.float64))
    return math.log(u) < log_r if u > 0 else True


def _cpu(generator: torch.Generator) -> torch.Generator:
    if generator.device.type == "cpu":
        return generator
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator,
                                    device=generator.device)))
    return g
