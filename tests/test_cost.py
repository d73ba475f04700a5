import pytest

from powersmc import cost


def test_paper_worked_example():
    """Sec. 6.4: N = 48, M = 10, K = 16 -> factor 43.5 and E[C_MH]/C_SMC ~ 0.91."""
    assert cost.global_edit_factor(10, 16) == 43.5
    assert cost.mh_smc_compute_ratio(10, 16, 48) == pytest.approx(0.90625)
    assert round(cost.mh_smc_compute_ratio(10, 16, 48), 2) == 0.91


def test_lemmas():
    assert cost.smc_token_evals(64, 2048) == 64 * 2048
    assert cost.smc_time(64, 100, lambda b: 32.0) == 200.0
    t, m, k = 3072, 10, 16
    assert cost.mh_global_edit_token_evals(t, m, k) == t * 43.5
    # the exact sum of the proof exceeds the approximation by M K / 2
    assert cost.mh_global_edit_token_evals(t, m, k, exact=True) == pytest.approx(
        t * 43.5 + m * k / 2)
    assert cost.mh_last_block_token_evals(t, m) == t * 6
    assert cost.mh_overhead_floor(10) == 6  # Corollary 4: >= 6x for M = 10


def test_time_ratio_and_relative_latency():
    assert cost.mh_smc_time_ratio(10, 16, 48, s_n=24.0) == pytest.approx(43.5 / 2)
    assert cost.smc_relative_latency(64, 40.0) == 1.6
