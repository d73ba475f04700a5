"""Parallel power tempering (PPT; Theodoropoulos et al., arXiv 2609.38104), as a program.

K replicas on a ladder 1 <= a_1 < ... < a_K; replica k targets pi_{a_k}(x) proportional to
p0(x)^{a_k} over fixed-horizon records of T tokens (after the first EOS the record is padded with
a token of probability 1, so p0(x) = prod_{t <= tau(x)} p(x_t | x_<t): the same target as
Power-SMC's, truncated answers included). The joint target is the product, so every rung has
its own marginal; the answer is the top rung's record, cut at its EOS.

The records grow in stages of B tokens (horizon T_m = min(mB, T)). Per stage: every open record
is extended to T_m at temperature 1/a_k (a warm start), then `mh_moves` rounds, each of
  * one local MH move per rung: keep x_<r, regenerate through T_m at temperature 1/a_k, accept
    with log R = sum_{t >= r} [zeta_t(y) - zeta_t(x)] at a_k (`mcmc.mh_log_ratio`); a cut in a
    record's padding is a self-transition with no model call;
  * one ordered sweep k = 1 .. K-1 of adjacent swaps, each committed before the next,
    accepted with min{1, exp[(a_{k+1} - a_k)(log p0(x_k) - log p0(x_{k+1}))]} (cached sums).
Every record keeps zeta_t at every rung's exponent, so a record that swaps rungs is scored at
its new exponent without a model call.

One difference from the paper, exact and chosen for batching: a round draws one cut r, uniform
on the horizon, for all rungs. The round's kernel is a mixture over r of products of per-rung
kernels, each reversible for its rung's target, so the product target is invariant exactly as
with independent cuts; the K regenerations then have the same length and step together as rows
of one batch, so K replicas take about the forward passes of one chain (independent cuts would
take the longest of K suffixes, about 1.6x at K = 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import (
    check_alpha,
    check_logprobs_backend,
    check_nonnegative_int,
    check_positive_int,
    encode_prompt,
    make_generator,
)
from powersmc.methods.mcmc import accept, mh_log_ratio, swap_log_ratio
from powersmc.methods.program import Continue, Program, Rows, spawn
from powersmc.results import SampleResult

RUNGS = 4


def default_ladder(alpha: float, rungs: int = RUNGS) -> tuple[float, ...]:
    """K = 4 rungs spaced geometrically from 1 + (alpha - 1)/2 to alpha.

    The bottom rung sits halfway between the base model and the target, so it moves freely
    while staying close enough to its neighbour to swap; the ratio of adjacent exponents is at
    most 2^(1/3) = 1.26 whatever alpha (the paper's GSM8K ladder: 1.15-1.17, its MATH500
    ladder: 1.06-1.07), and the paper's gains saturate at K = 4-5."""
    lo = 1.0 + (alpha - 1.0) / 2.0
    if rungs == 1 or alpha == lo:
        return (alpha,)
    return tuple(lo * (alpha / lo) ** (k / (rungs - 1)) for k in range(rungs))


def check_ladder(alphas: Sequence[float]) -> list[float]:
    """A ladder of exponents: finite, >= 1, strictly increasing."""
    if isinstance(alphas, (str, bytes)):
        raise InputError("alphas", "a list of numbers (the ladder)", alphas)
    try:
        ladder = [float(a) for a in alphas]
    except (TypeError, ValueError):
        raise InputError("alphas", "a list of numbers (the ladder)", alphas) from None
    if not ladder or any(not math.isfinite(a) or a < 1 for a in ladder):
        raise InputError("alphas", "a non-empty ladder of finite numbers >= 1", list(alphas))
    if any(b <= a for a, b in zip(ladder, ladder[1:], strict=False)):
        raise InputError("alphas", "a strictly increasing ladder", list(alphas))
    return ladder


@dataclass
class Record:
    """A fixed-horizon record: its tokens (up to EOS or the horizon), log p of each, and zeta_t
    at every rung's exponent (one tuple per position)."""

    tokens: list[int]
    lp: list[float]
    zeta: list[list[float]]
    finished: bool

    def then(self, r: int, rows: Rows) -> Record:
        """x_<r of this record followed by the one row of `rows`."""
        return Record(self.tokens[:r] + rows.tokens[0], self.lp[:r] + rows.logp[0],
                      self.zeta[:r] + rows.zeta[0], rows.finished[0])

    def zeta_from(self, r: int, k: int) -> list[float]:
        return [z[k] for z in self.zeta[r:]]

    @property
    def log_p(self) -> float:
        return math.fsum(self.lp)


def ppt_program(
    model: LanguageModel,
    prompt: Prompt,
    *,
    alpha: float = 4.0,
    max_new_tokens: int = 512,
    alphas: Sequence[float] | None = None,
    stage_tokens: int = 192,
    mh_moves: int = 10,
    seed: int | None = None,
) -> Program:
    """PPT (see the module docstring). `alphas`: the ladder (default `default_ladder(alpha)`;
    given, its top rung is the target and `alpha` is not used); `stage_tokens`: B;
    `mh_moves`: rounds per stage. The result's stats report the ladder, each adjacent pair's
    swap acceptance and each rung's move acceptance (over moves that called the model)."""
    alpha = check_alpha(alpha)
    ladder = tuple(check_ladder(alphas) if alphas is not None else default_ladder(alpha))
    B = check_positive_int("stage_tokens", stage_tokens)
    check_nonnegative_int("mh_moves", mh_moves)
    check_logprobs_backend(model, "method", "parallel power tempering (zeta at every rung)")
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    K, T = len(ladder), max_new_tokens
    recs = [Record([], [], [], False) for _ in range(K)]
    moved, took = [0] * K, [0] * K
    swapped, tried = [0] * max(K - 1, 0), [0] * max(K - 1, 0)

    def regenerate(k: int, r: int, horizon: int) -> Continue:
        """Rung k's record kept up to r, continued through `horizon` at temperature 1/a_k."""
        return Continue(ids + recs[k].tokens[:r], 1, horizon - r, spawn(gen),
                        tau=1.0 / ladder[k], zeta_alphas=ladder)

    for m in range(1, math.ceil(T / B) + 1):
        H = min(m * B, T)
        grow = [k for k in range(K) if not recs[k].finished and len(recs[k].tokens) < H]
        if grow:  # the warm start: extend every open record to the stage's horizon
            outs = yield [regenerate(k, len(recs[k].tokens), H) for k in grow]
            for k, rows in zip(grow, outs, strict=True):
                recs[k] = recs[k].then(len(recs[k].tokens), rows)
        for _ in range(mh_moves):
            r = int(torch.randint(H, (1,), generator=gen, device=model.device))
            movers = [k for k in range(K) if r < len(recs[k].tokens)]  # else: in the padding
            if movers:
                outs = yield [regenerate(k, r, H) for k in movers]
                for k, rows in zip(movers, outs, strict=True):
                    new = recs[k].then(r, rows)
                    moved[k] += 1
                    if accept(mh_log_ratio(new.zeta_from(r, k), recs[k].zeta_from(r, k)), gen):
                        recs[k], took[k] = new, took[k] + 1
            for k in range(K - 1):  # one ordered sweep of adjacent swaps
                tried[k] += 1
                if accept(swap_log_ratio(ladder[k], ladder[k + 1], recs[k].log_p,
                                         recs[k + 1].log_p), gen):
                    recs[k], recs[k + 1] = recs[k + 1], recs[k]
                    swapped[k] += 1
    top = recs[-1]
    return SampleResult(
        method="ppt", text=model.decode(top.tokens), token_ids=top.tokens, seed=seed,
        finished=top.finished, samples=[r.tokens for r in recs],
        texts=[model.decode(r.tokens) for r in recs],
        stats={"alphas": list(ladder), "stage_tokens": B, "mh_moves": mh_moves,
               "swap_acceptance": [s / t if t else None for s, t in zip(swapped, tried,
                                                                            strict=True)],
               "move_acceptance": [a / n if n else None for a, n in zip(took, moved,
                                                                          strict=True)],
               "moves": moved, "log_p": [r.log_p for r in recs]})
