"""Exact distributions of enumerable models, for testing samplers against ground truth.

Enumerates every sequence a `FunctionLM` can produce within `max_new_tokens` tokens: sequences
ending in an EOS id (length <= T) and unfinished prefixes of length exactly T (kept as truncated
sequences, the convention of `smc_sample`). Feasible for vocabularies and horizons such that
V^T stays in the tens of thousands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from powersmc.backends.function_lm import FunctionLM

Seq = tuple[int, ...]


def _walk(lm: FunctionLM, prompt: Sequence[int], T: int,
          token_logprob: Callable[[torch.Tensor], torch.Tensor]) -> dict[Seq, float]:
    """log-weight of every terminal sequence, where each token contributes token_logprob(logp)."""
    out: dict[Seq, float] = {}
    stack: list[tuple[Seq, float]] = [((), 0.0)]
    base = tuple(int(i) for i in prompt)
    while stack:
        seq, lw = stack.pop()
        contrib = token_logprob(lm._logprobs(base + seq).double())
        for v in range(lm.vocab_size):
            c = float(contrib[v])
            if c == -math.inf:
                continue
            nxt, nlw = seq + (v,), lw + c
            if v in lm.eos_token_ids or len(nxt) == T:
                out[nxt] = nlw
            else:
                stack.append((nxt, nlw))
    return out


def _normalize(logw: dict[Seq, float]) -> tuple[dict[Seq, float], float]:
    m = max(logw.values())
    log_z = m + math.log(sum(math.exp(v - m) for v in logw.values()))
    return {k: math.exp(v - log_z) for k, v in logw.items()}, log_z


def power_distribution(lm: FunctionLM, prompt: Sequence[int], max_new_tokens: int,
                       alpha: float) -> tuple[dict[Seq, float], float]:
    """pi_alpha(y) = p(y)^alpha / Z_alpha (eq. 1) over all sequences; returns (pi, log Z_alpha)."""
    return _normalize(_walk(lm, prompt, max_new_tokens, lambda lp: alpha * lp))


def tempered_distribution(lm: FunctionLM, prompt: Sequence[int], max_new_tokens: int,
                          tau: float) -> dict[Seq, float]:
    """The token-level product distribution of temperature-tau sampling (eq. 3)."""
    return decoder_distribution(lm, prompt, max_new_tokens,
                                lambda lp: torch.log_softmax(lp / tau, -1))


def decoder_distribution(lm: FunctionLM, prompt: Sequence[int], max_new_tokens: int,
                         logq: Callable[[torch.Tensor], torch.Tensor]) -> dict[Seq, float]:
    """The sequence distribution of a token-by-token decoder drawing from logq(log p) (a
    normalised next-token distribution, e.g. a top-k / top-p nucleus): the product of its
    conditionals."""
    return {k: math.exp(v) for k, v in _walk(lm, prompt, max_new_tokens, logq).items()}


def total_variation(p: dict[Seq, float], q: dict[Seq, float]) -> float:
    """TV(p, q) = 1/2 sum_y |p(y) - q(y)|."""
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)
