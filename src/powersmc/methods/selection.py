"""Choosing the answer from weighted particles, and combining independent Power-SMC rounds.

* select='sample' (default): the paper's output, one particle drawn from the final normalised
  weights (Algorithm 1, line 23; eq. 5's weights). Distributed as pi_alpha as N grows; for every
  N the evidence-weighted draw is exact: E[Z_hat 1{y_out = y}] = Z_alpha pi_alpha(y) (eq. 1).
* select='vote': the answer whose particles carry the largest total normalised weight, i.e. the
  mode of the self-normalised estimate (eq. 5) of the answer's pi_alpha-probability. Answers
  are compared by `key(text)` (default: the text itself; the evaluation passes the grader's
  extraction and normalisation). Not a draw from pi_alpha: an estimate of its most likely
  answer.
* select='majority': self-consistency (Wang et al. 2023) over the answers: the answer held by
  the most particles or samples wins, unweighted (ties: the pool with the highest summed
  weight, for samples their summed log-likelihood). Not a draw from pi_alpha.
* select='consensus' (CCPS, arXiv 2609.12243): identical token sequences are merged into one
  trajectory (one vote, their weights pooled); answers the key judges equal form a cluster; the
  cluster with the most distinct trajectories wins, ties broken by pooled weight. Particles
  without an answer do not vote.
* rounds=R: R independent particle systems on the same prompt. Round r is picked with
  probability Z_hat_r / sum_s Z_hat_s, then its own drawn particle: the answer is drawn with
  probability proportional to Z_hat_r * W_r^i. With Z_hat = (1/R) sum_r Z_hat_r (still unbiased
  for Z_alpha), E[Z_hat 1{y_out = y}] = (1/R) sum_r E[Z_hat_r sum_i W_r^i 1{y_r^i = y}]
  = Z_alpha pi_alpha(y): exact for every N and R, and the raw output's O(1/N) bias shrinks with R.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

from powersmc.errors import InputError
from powersmc.results import Cost, ImportanceResult, Particle, SMCResult

SELECTS = ("sample", "vote", "majority", "consensus")
AnswerKey = Callable[[str], Hashable | None]
Weighted = TypeVar("Weighted", SMCResult, ImportanceResult)
TIE_RTOL = 1e-9  # answer totals this close are a tie (sums of the same weights in other orders)


def check_select(select: str) -> str:
    if select not in SELECTS:
        raise InputError("select", "'sample' (draw one particle), 'vote' (weighted vote), "
                         "'majority' (most answers) or 'consensus' (most distinct "
                         "trajectories)", select)
    return select


def normalized(particles: Sequence[Particle]) -> list[float]:
    """Normalised weights W_i (eq. 6) of particles from their log-weights."""
    top = max(p.log_weight for p in particles)
    if not math.isfinite(top):
        return [1.0 / len(particles)] * len(particles)
    raw = [math.exp(p.log_weight - top) for p in particles]
    total = sum(raw)
    return [x / total for x in raw]


def weighted_vote(particles: Sequence[Particle], key: AnswerKey | None = None) -> int | None:
    """Index of a particle of the answer with the largest total normalised weight.

    key(text) -> answer (hashable), or None when the text holds no answer; such particles do
    not vote (their weight is left out, as in self-consistency voting). Ties between answers
    (totals equal up to TIE_RTOL) are broken by the largest single particle weight, then by
    the lowest index; the returned particle is the heaviest of the winning answer. None if no
    particle has an answer.
    """
    key = key or (lambda text: text)
    total: dict[Hashable, float] = {}
    best: dict[Hashable, int] = {}
    weights = normalized(particles)
    for i, (p, w) in enumerate(zip(particles, weights, strict=True)):
        k = key(p.text)
        if k is None:
            continue
        total[k] = total.get(k, 0.0) + w
        if k not in best or w > weights[best[k]]:
            best[k] = i
    if not total:
        return None
    top = max(total.values())
    tied = [k for k in total if total[k] >= top * (1 - TIE_RTOL)]  # equal up to round-off
    winner = max(tied, key=lambda k: (weights[best[k]], -best[k]))
    return best[winner]


def _pools(texts: Sequence[str], key: AnswerKey | None) -> dict[Hashable, list[int]]:
    """Indices of the answers, pooled by key(text) (answers with no key left out)."""
    key = key or (lambda text: text)
    pools: dict[Hashable, list[int]] = {}
    for i, text in enumerate(texts):
        k = key(text)
        if k is not None:
            pools.setdefault(k, []).append(i)
    return pools


def majority(texts: Sequence[str], scores: Sequence[float],
             key: AnswerKey | None = None) -> int | None:
    """Index of an answer of the largest pool (self-consistency): pools by key(text); ties
    between pools of equal size go to the highest summed score (then the first seen); the
    returned index is its pool's highest-scoring member. None if no text has an answer."""
    pools = _pools(texts, key)
    if not pools:
        return None
    def rank(k: Hashable) -> tuple[int, float]:
        return len(pools[k]), math.fsum(scores[i] for i in pools[k])
    top = max(pools, key=rank)  # max keeps the first of equal ranks
    return max(pools[top], key=lambda i: (scores[i], -i))


def consensus(particles: Sequence[Particle], key: AnswerKey | None = None) -> int | None:
    """Index of a particle of the consensus cluster (see the module docstring): the cluster
    with the most distinct token sequences, ties by pooled normalised weight; the returned
    particle is the heaviest trajectory of that cluster. None if no particle has an answer."""
    weights = normalized(particles)
    merged: dict[tuple[int, ...], tuple[int, float]] = {}  # sequence -> (first index, weight)
    for i, (p, w) in enumerate(zip(particles, weights, strict=True)):
        seq = tuple(p.token_ids)
        first, total = merged.get(seq, (i, 0.0))
        merged[seq] = (first, total + w)
    firsts = [first for first, _ in merged.values()]
    pooled = [w for _, w in merged.values()]
    pools = _pools([particles[i].text for i in firsts], key)
    if not pools:
        return None
    top = max(pools, key=lambda k: (len(pools[k]), math.fsum(pooled[j] for j in pools[k])))
    return firsts[max(pools[top], key=lambda j: (pooled[j], -j))]


def combine_rounds(rounds: Sequence[SMCResult], generator: torch.Generator) -> SMCResult:
    """R independent Power-SMC results on one prompt as one result (see the module docstring).

    particles: all R*N particles, log-weights log Z_hat_r + log W_r^i (so their softmax gives
    the combined weights); log_z: log((1/R) sum_r Z_hat_r); ess / resample_steps / log_z_t:
    those of the picked round; cost: token evaluations and prefill summed over rounds.
    """
    log_zs = torch.tensor([r.log_z for r in rounds], dtype=torch.float64)
    probs = torch.softmax(log_zs, 0)
    pick = int(torch.multinomial(probs.to(generator.device), 1, generator=generator))
    parts: list[Particle] = []
    offset = 0
    for i, r in enumerate(rounds):
        lse = torch.logsumexp(torch.tensor([p.log_weight for p in r.particles],
                                           dtype=torch.float64), 0).item()
        parts += [Particle(p.token_ids, p.text, r.log_z + p.log_weight - lse, p.finished)
                  for p in r.particles]
        if i < pick:
            offset += len(r.particles)
    chosen = rounds[pick]
    index = offset + chosen.stats["chosen_particle"]
    cost = Cost(seconds=chosen.cost.seconds, forward_passes=chosen.cost.forward_passes,
                token_evals=sum(r.cost.token_evals for r in rounds),
                prefill_tokens=sum(r.cost.prefill_tokens for r in rounds))
    stats = {**chosen.stats, "chosen_particle": index, "rounds": len(rounds), "round": pick,
             "round_log_z": log_zs.tolist(),
             "num_resamples": sum(r.stats["num_resamples"] for r in rounds)}
    return SMCResult(
        method=chosen.method, text=chosen.text, token_ids=chosen.token_ids, seed=chosen.seed,
        cost=cost, finished=chosen.finished, particles=parts, ess=chosen.ess,
        resample_steps=chosen.resample_steps,
        log_z=float(torch.logsumexp(log_zs, 0)) - math.log(len(rounds)),
        log_z_t=chosen.log_z_t, alpha=chosen.alpha, num_particles=chosen.num_particles,
        stats=stats)


def apply_select(result: Weighted, select: str, key: AnswerKey | None = None) -> Weighted:
    """select='vote' / 'majority' / 'consensus': make the selected particle the result's
    answer (the drawn one stays at stats['chosen_particle']; stats['voted_particle'] is None
    when no particle has an answer, and the drawn answer is kept)."""
    result.stats["select"] = select
    if select == "sample":
        return result
    parts = result.particles
    if select == "vote":
        v = weighted_vote(parts, key)
    elif select == "majority":
        v = majority([p.text for p in parts], normalized(parts), key)
    else:
        v = consensus(parts, key)
    result.stats["voted_particle"] = v
    if v is not None:
        p = parts[v]
        result.text, result.token_ids, result.finished = p.text, p.token_ids, p.finished
    return result


def finish(results: list[SMCResult], rounds: int, select: str, key: AnswerKey | None,
           generator: torch.Generator) -> list[SMCResult]:
    """P*R per-system results (prompt-major) -> P answers: rounds combined, then selected."""
    if rounds > 1:
        results = [combine_rounds(results[g : g + rounds], generator)
                   for g in range(0, len(results), rounds)]
    return [apply_select(r, select, key) for r in results]
