"""The engine-independent cost model of Sec. 6 (Lemmas 1-3, Corollaries 2-4).

A token evaluation ("token-eval") is one cached forward step producing next-token logits for
one sequence; a decode step at batch b costs b token-evals and takes time proportional to
b / s(b), where s(b) >= 1 is the batch-throughput multiplier relative to batch 1. T is the
number of generated tokens, B the MH block length (K = T / B blocks), M the MH moves per block,
N the number of SMC particles.
"""

from __future__ import annotations

from collections.abc import Callable


def smc_token_evals(n: int, t: int) -> int:
    """Lemma 1: C_SMC = N * T."""
    return n * t


def smc_time(n: int, t: int, s: Callable[[int], float]) -> float:
    """Lemma 1: Time_SMC proportional to T * N / s(N), in units of one batch-1 decode step."""
    return t * n / s(n)


def mh_global_edit_token_evals(t: int, m: int, k: int, exact: bool = False) -> float:
    """Lemma 2 (edit index uniform over the whole prefix): E[C_MH] ~ T (1 + M (K+1) / 4).

    exact=True keeps the proof's (t_k + 1) / 2 instead of t_k / 2:
    T + M * sum_k (k B + 1) / 2 = T + M (B K (K+1) / 4 + K / 2).
    """
    if not exact:
        return t * (1 + m * (k + 1) / 4)
    b = t / k
    return t + m * (b * k * (k + 1) / 4 + k / 2)


def mh_last_block_token_evals(t: int, m: int) -> float:
    """Lemma 3 (edit index uniform within the last block): E[C_MH] ~ T (1 + M / 2)."""
    return t * (1 + m / 2)


def global_edit_factor(m: int, k: int) -> float:
    """The global-edit compute factor 1 + M (K+1) / 4 (Lemma 2, Corollaries 2-3)."""
    return 1 + m * (k + 1) / 4


def mh_smc_compute_ratio(m: int, k: int, n: int) -> float:
    """Corollary 2: E[C_MH] / C_SMC ~ (1 + M (K+1) / 4) / N."""
    return global_edit_factor(m, k) / n


def mh_smc_time_ratio(m: int, k: int, n: int, s_n: float) -> float:
    """Corollary 3: Time_MH / Time_SMC ~ (1 + M (K+1) / 4) * s(N) / N (MH at batch 1)."""
    return global_edit_factor(m, k) * s_n / n


def mh_overhead_floor(m: int) -> float:
    """Corollary 4: MH overhead relative to baseline decoding is at least 1 + M / 2."""
    return 1 + m / 2


def smc_relative_latency(n: int, s_n: float) -> float:
    """Predicted SMC latency relative to batch-1 decoding of the same length: N / s(N)."""
    return n / s_n
