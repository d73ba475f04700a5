"""Scalable Power Sampling (Ji et al. 2026, arXiv 2601.21590).

The next-token conditional of pi_alpha is  pi(v | y_<t) proportional to p(v)^alpha * zeta(v)
with the future factor zeta(v) = sum_future p(future | y_<t, v)^alpha
                               = E_{future ~ p}[ p(future)^(alpha - 1) ].
At every step, zeta is estimated for the top-K candidate tokens by M rollouts of the base model
(temperature 1) from y_<t v, each of at most `horizon` tokens (and never past max_new_tokens):
zeta_hat(v) = mean_s p(rollout_s)^(alpha - 1). The normalized estimate is a ratio, biased by
O(1/M); the jackknife  M p_hat - ((M-1)/M) sum_s p_hat_(-s)  (leave-one-rollout-out) cuts the
bias to O(1/M^2). Negative jackknife values are clipped to zero and the rest renormalized.
All K*M rollouts of a step are `Continue` requests of the one `Scheduler` (`methods.program`):
their rows join the running batch, one forward pass per rollout token shared with everything
else in flight. The next-token distribution after the chosen token is the one its rollouts
started from (`Rows.first_logp`), so the answer itself costs no pass of its own.
Tokens outside the top K get probability zero (the method's restriction, not ours).
"""

from __future__ import annotations

import math
from collections.abc import Generator

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.methods.common import (
    check_alpha,
    check_logprobs_backend,
    check_positive_int,
    encode_prompt,
    make_generator,
)
from powersmc.methods.program import Continue, Program, Rows, spawn
from powersmc.results import SampleResult


def zeta_probabilities(lp_cand: torch.Tensor, log_zeta: torch.Tensor, alpha: float,
                       jackknife: bool) -> torch.Tensor:
    """pi_alpha's next-token conditional over K candidates from M rollouts each.

    lp_cand: log p of the candidates [K]; log_zeta: (alpha - 1) log p(rollout) [K, M] (zero
    rows for candidates with zeta = 1 exactly: EOS, or no horizon left). Returns
    softmax(alpha lp + log zeta_hat), with the leave-one-out jackknife when asked."""
    m = log_zeta.shape[1]
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
    return p_hat


def power_conditional(
    ids: list[int], logp: torch.Tensor, eos: torch.Tensor, *, alpha: float, candidates: int,
    rollouts: int, horizon: int, jackknife: bool, generator: torch.Generator,
) -> Generator[list[Continue], list[Rows], tuple[torch.Tensor, torch.Tensor, dict[int, Rows]]]:
    """Sub-program: estimate pi_alpha's next-token conditional after `ids` over the top K
    tokens of `logp` [V] (the model's next-token log-probs there), from M rollouts of at most
    `horizon` tokens per candidate. Returns (candidate ids [K], probabilities [K], the rollouts
    of each rolled-out candidate by its place). With horizon 0 no rollout runs and the result
    is p^alpha renormalized over the candidates."""
    lp_cand, cand = torch.topk(logp, min(candidates, logp.shape[-1]))
    lp_cand, cand = lp_cand.double().cpu(), cand.cpu()
    log_zeta = torch.zeros((cand.numel(), rollouts), dtype=torch.float64)
    live = [] if horizon == 0 else (~torch.isin(cand, eos)).nonzero().squeeze(1).tolist()
    outs: list[Rows] = []
    if live:  # EOS candidates: zeta = 1 exactly
        outs = yield [Continue(ids + [int(cand[i])], rollouts, horizon, spawn(generator),
                               keep_logp=True) for i in live]
        for i, rows in zip(live, outs, strict=True):
            log_zeta[i] = (alpha - 1.0) * torch.tensor(rows.log_p(), dtype=torch.float64)
    probs = zeta_probabilities(lp_cand, log_zeta, alpha, jackknife)
    return cand, probs, dict(zip(live, outs, strict=True))


def spower_program(
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
) -> Program:
    """Autoregressive sampling from the rollout estimate of pi_alpha's conditionals.

    Defaults: K = `candidates` = 8, M = `rollouts` = 8, horizon 192 (the settings of public
    reimplementations). Cost per generated token is about K * M * horizon token evaluations.
    (K is not called `top_k`: in this library `top_k` always means truncating the target.)
    Needs an engine with next-token log-probabilities (not vLLM).
    """
    alpha = check_alpha(alpha)
    check_logprobs_backend(model, "method", "spower (Scalable Power Sampling)")
    check_positive_int("candidates", candidates)
    check_positive_int("rollouts", rollouts)
    check_positive_int("horizon", horizon)
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    eos = torch.tensor(model.eos_token_ids, dtype=torch.long)
    (first,) = yield [Continue(ids, 1, 1, spawn(gen), keep_logp=True)]  # p(. | prompt)
    logp = first.first_logp
    tokens: list[int] = []
    log_p, finished = 0.0, False
    for t in range(max_new_tokens):
        assert logp is not None
        cand, probs, outs = yield from power_conditional(
            ids + tokens, logp, eos, alpha=alpha, candidates=candidates, rollouts=rollouts,
            horizon=min(horizon, max_new_tokens - t - 1), jackknife=jackknife, generator=gen)
        pick = int(torch.multinomial(probs.to(gen.device), 1, generator=gen))
        tokens.append(int(cand[pick]))
        log_p += float(logp[cand[pick]])
        if tokens[-1] in model.eos_token_ids:
            finished = True
            break
        logp = outs[pick].first_logp if pick in outs else None
    return SampleResult(
        method="spower", text=model.decode(tokens), token_ids=tokens, seed=seed,
        finished=finished,
        stats={"candidates": candidates, "rollouts": rollouts, "horizon": horizon,
               "jackknife": jackknife, "log_p": log_p},
    )
