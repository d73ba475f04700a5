"""Scalable Power Sampling (Ji et al. 2026, arXiv 2601.21590).

The next-token conditional of pi_alpha is  pi(v | y_<t) proportional to p(v)^alpha * zeta(v)
with the future factor zeta(v) = sum_future p(future | y_<t, v)^alpha
                               = E_{future ~ p}[ p(future)^(alpha - 1) ].
At every step, zeta is estimated for the top-K candidate tokens by M rollouts of the base model
(temperature 1) from y_<t v, each of at most `horizon` tokens (and never past max_new_tokens):
zeta_hat(v) = mean_s p(rollout_s)^(alpha - 1). The normalized estimate is a ratio, biased by
O(1/M); the jackknife  M p_hat - ((M-1)/M) sum_s p_hat_(-s)  (leave-one-rollout-out) cuts the
bias to O(1/M^2). Negative jackknife values are clipped to zero and the rest renormalized.
All K*M rollouts of a step run as one batch: one forward pass per rollout token.
Tokens outside the top K get probability zero (the method's restriction, not ours).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.methods.common import (
    check_alpha,
    check_logprobs_backend,
    check_positive_int,
    encode_prompt,
    make_generator,
)
from powersmc.methods.rollout import TemperatureRule, rollout
from powersmc.results import Cost, SampleResult


def power_next_token(
    model: LanguageModel,
    state: Any,
    logp: torch.Tensor,
    *,
    alpha: float,
    candidates: int,
    rollouts: int,
    horizon: int,
    jackknife: bool,
    generator: torch.Generator,
    cost: Cost,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate pi_alpha's next-token conditional over the top-K tokens of `logp` [1, V].

    `state` (1 row) holds the prefix; it is forked, never modified. Returns (candidate ids [K],
    probabilities [K]). With horizon 0 no rollout runs and the result is p^alpha renormalized.
    """
    k = min(candidates, logp.shape[-1])
    lp_cand, cand = torch.topk(logp[0], k)
    lp_cand, m = lp_cand.double(), rollouts
    log_zeta = torch.zeros((k, m), dtype=torch.float64, device=logp.device)
    eos = torch.tensor(model.eos_token_ids, device=logp.device)
    live = (~torch.isin(cand, eos)).nonzero().squeeze(1)  # EOS candidates: zeta = 1 exactly
    if horizon > 0 and live.numel() > 0:
        fork = model.fork(state)
        rows = live.repeat_interleave(m)
        model.reorder(fork, torch.zeros(rows.numel(), dtype=torch.long, device=logp.device))
        first = model.step(fork, cand[rows])
        cost.add_step(rows.numel())
        ro = rollout(model, fork, first, horizon, TemperatureRule(1.0), generator, cost)
        log_zeta[live] = (alpha - 1.0) * ro.logp.sum(1).view(live.numel(), m)
    base = alpha * lp_cand

    def probs(lz: torch.Tensor) -> torch.Tensor:  # lz: log zeta_hat per candidate
        return torch.softmax(base + lz, 0)

    p_hat = probs(torch.logsumexp(log_zeta, 1) - math.log(m))
    if jackknife and m > 1:
        loo = torch.stack([
            probs(torch.logsumexp(torch.cat([log_zeta[:, :s], log_zeta[:, s + 1:]], 1), 1)
                  - math.log(m - 1))
            for s in range(m)
        ])
        jk = (m * p_hat - (m - 1) / m * loo.sum(0)).clamp_min(0.0)
        if jk.sum() > 0:
            p_hat = jk / jk.sum()
    return cand, p_hat


def scalable_power_sample(
    model: LanguageModel,
    prompt: Prompt,
    *,
    alpha: float = 4.0,
    candidates: int = 8,
    rollouts: int = 8,
    horizon: int = 192,
    jackknife: bool = True,
    max_new_tokens: int = 512,
    seed: int | None = None,
) -> SampleResult:
    """Autoregressive sampling from the rollout estimate of pi_alpha's conditionals.

    Defaults: K = `candidates` = 8, M = `rollouts` = 8, horizon 192 (the settings of public
    reimplementations). Cost per generated token is about K * M * horizon token evaluations.
    (K is not called `top_k`: in this library `top_k` always means truncating the target.)
    """
    alpha = check_alpha(alpha)
    check_logprobs_backend(model, "method", "spower (Scalable Power Sampling)")
    check_positive_int("candidates", candidates)
    check_positive_int("rollouts", rollouts)
    check_positive_int("horizon", horizon)
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    cost = Cost()
    start = time.perf_counter()
    # the answer plus one step's K * M rollouts of at most horizon + 1 tokens
    state, logp = model.prefill(ids, 1,
                                budget=max_new_tokens + candidates * rollouts * (horizon + 1))
    cost.add_prefill(len(ids))
    tokens: list[int] = []
    log_p, finished = 0.0, False
    for t in range(max_new_tokens):
        h = min(horizon, max_new_tokens - t - 1)
        cand, probs = power_next_token(model, state, logp, alpha=alpha, candidates=candidates,
                                       rollouts=rollouts, horizon=h, jackknife=jackknife,
                                       generator=gen, cost=cost)
        tok = cand[torch.multinomial(probs, 1, generator=gen)]
        tokens.append(int(tok))
        log_p += float(logp[0, tok])
        if tokens[-1] in model.eos_token_ids:
            finished = True
            break
        if t + 1 < max_new_tokens:
            logp = model.step(state, tok.view(1))
            cost.add_step(1)
    cost.seconds = time.perf_counter() - start
    return SampleResult(
        method="spower", text=model.decode(tokens), token_ids=tokens, seed=seed, cost=cost,
        finished=finished,
        stats={"candidates": candidates, "rollouts": rollouts, "horizon": horizon,
               "jackknife": jackknife, "log_p": log_p},
    )
