import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from powersmc.proposals import TemperatureProposal, truncate_logprobs
from powersmc.weights import (
    ess,
    incremental_log_weight,
    log_mean_weight,
    log_power_normalizer,
    logsumexp_rows,
    normalized_weights,
    renyi_entropy,
)

logits_st = st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=30)
alpha_st = st.floats(1.0, 8.0)


def test_ess_extremes():
    assert math.isclose(float(ess(torch.zeros(16, dtype=torch.float64))), 16.0)
    lw = torch.full((16,), -math.inf, dtype=torch.float64)
    lw[3] = 0.0
    assert math.isclose(float(ess(lw)), 1.0)


def test_ess_matches_definition():
    lw = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    w = normalized_weights(lw)
    assert math.isclose(float(ess(lw)), float(1 / (w**2).sum()), rel_tol=1e-12)
    assert math.isclose(float(log_mean_weight(lw)), math.log(float(lw.exp().mean())), rel_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(logits=logits_st, alpha=alpha_st)
def test_theorem1_zero_variance(logits, alpha):
    """Under q = p^alpha / Z (tau = 1/alpha) the incremental weight equals log Z_t for every
    token (Theorem 1); eq. 13 links it to the Renyi entropy."""
    logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    logq = TemperatureProposal()(logp, alpha)
    inc = incremental_log_weight(logp, logq, alpha)
    log_z = log_power_normalizer(logp, alpha)
    assert torch.allclose(inc, log_z.expand_as(inc), atol=1e-9)
    assert float(log_z) <= 1e-12
    if alpha > 1.0 + 1e-6:
        assert math.isclose(float(log_z), (1 - alpha) * float(renyi_entropy(logp, alpha)),
                            rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(logits=logits_st, other=logits_st, alpha=alpha_st)
def test_theorem1_minimal_second_moment(logits, other, alpha):
    """Any other full-support proposal has second moment E_q[w^2] >= that of q* (Theorem 1)."""
    logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    k = logp.numel()
    o = (other * k)[:k]
    logq = torch.log_softmax(torch.tensor(o, dtype=torch.float64), -1)
    qstar = TemperatureProposal()(logp, alpha)

    def second_moment(lq):
        return torch.logsumexp(2 * alpha * logp - lq, -1)

    assert float(second_moment(logq)) >= float(second_moment(qstar)) - 1e-9


def test_plain_temperature_has_weight_variance():
    logp = torch.log_softmax(torch.tensor([2.0, 0.5, -1.0, 0.0], dtype=torch.float64), -1)
    inc = incremental_log_weight(logp, TemperatureProposal(tau=1.0)(logp, 4.0), 4.0)
    assert float(inc.std()) > 0.5


def test_truncation_renormalizes():
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]), -1)
    k2 = truncate_logprobs(logp, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and math.isclose(float(k2.exp().sum()), 1.0, rel_tol=1e-6)
    p = truncate_logprobs(logp, top_p=0.5)
    kept = torch.isfinite(p[0]).sum().item()
    assert kept == 1 + int(float(logp[0, 0].exp()) < 0.5)
    assert torch.equal(truncate_logprobs(logp), torch.log_softmax(logp, -1))


def test_logsumexp_rows_is_the_float32_logsumexp():
    """Rows spanning hundreds of nats (alpha * log p) and rows with truncated (-inf) entries:
    the floored sum equals float64's logsumexp of the same floats within float32 rounding
    (a pairwise sum of V terms, each within 2^-24: about log2(V) * 6e-8 relative, plus the
    final add's |m| * 6e-8)."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(8, 49152, generator=gen) * 12, -1)
    x = 4.0 * logp
    x[4:, 1000:] = -math.inf  # a truncated target keeps 1000 tokens
    assert float(x.min(-1).values[:4].max()) < -300  # most terms would be subnormal
    got = logsumexp_rows(x).squeeze(-1).double()
    want = torch.logsumexp(x.double(), -1)
    tol = 16 * 6e-8 * (1 + want.abs())
    assert ((got - want).abs() <= tol).all(), (got - want).abs().max()
