"""Importance-resampled best-of-N: N plain samples, one drawn in proportion to p(y)^(alpha-1).

Self-normalised importance sampling (eq. 4-5) with the base model as proposal, q = p
(temperature 1, full vocabulary): the weight of a whole answer is gamma(y) / q(y) =
p(y)^alpha / p(y) = p(y)^(alpha - 1). One answer is resampled from the normalised weights, so
the output targets pi_alpha (eq. 1) as N grows (bias O(1/N)); for every N the evidence-weighted
draw is exact, E[Z_hat 1{y_out = y}] = Z_alpha pi_alpha(y) with Z_hat = (1/N) sum_i w_i
unbiased for Z_alpha. It costs one batched decode of N rows (Lemma 1's N*T token-evals, no
resampling), but its weights degenerate much faster than Power-SMC's in T: SMC corrects them
token by token with the tempered proposal (Theorem 1) instead of once at the end.
Unfinished samples at max_new_tokens are kept as truncated sequences (as in `smc_sample`).
"""

from __future__ import annotations

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.methods.common import check_alpha, check_positive_int, encode_prompt, make_generator
from powersmc.methods.program import Continue, Program
from powersmc.methods.selection import AnswerKey, apply_select, check_select
from powersmc.results import ImportanceResult, Particle
from powersmc.weights import ess, log_mean_weight


def bon_program(
    model: LanguageModel,
    prompt: Prompt,
    *,
    alpha: float = 4.0,
    num_samples: int = 16,
    max_new_tokens: int = 512,
    seed: int | None = None,
    select: str = "sample",
    key: AnswerKey | None = None,
) -> Program:
    """Draw N = `num_samples` answers from p(y|x) as one request's rows and return one of
    them, drawn with probability proportional to p(y)^(alpha - 1) (select='sample'), or the
    answer with the largest total normalised weight (select='vote', answers compared by
    `key`)."""
    alpha = check_alpha(alpha)
    n = check_positive_int("num_samples", num_samples)
    check_select(select)
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    (out,) = yield [Continue(ids, n, max_new_tokens, gen)]
    log_p = torch.tensor(out.log_p(), dtype=torch.float64)
    log_w = (alpha - 1.0) * log_p
    total = torch.logsumexp(log_w, 0)
    chosen = int(torch.multinomial(torch.exp(log_w - total).to(gen.device), 1, generator=gen))
    texts = [model.decode(s) for s in out.tokens]
    lw = log_w.tolist()
    parts = [Particle(out.tokens[i], texts[i], lw[i], out.finished[i]) for i in range(n)]
    best = parts[chosen]
    result = ImportanceResult(
        method="bon", text=best.text, token_ids=best.token_ids, seed=seed,
        finished=best.finished, samples=out.tokens, texts=texts, particles=parts,
        log_z=float(log_mean_weight(log_w)),
        ess=float(ess(log_w)), alpha=alpha, num_particles=n,
        stats={"chosen_particle": chosen, "log_p": log_p.tolist()},
    )
    return apply_select(result, select, key)
