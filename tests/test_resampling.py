import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stats import z_threshold

from powersmc.errors import InputError
from powersmc.resampling import RESAMPLERS, get_resampler

SCHEMES = list(RESAMPLERS)

weights_st = st.lists(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=1, max_size=40
).filter(lambda w: sum(w) > 1e-6)


def _w(values, dtype=torch.float64):
    w = torch.tensor(values, dtype=dtype)
    return w / w.sum()


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=60, deadline=None)
@given(values=weights_st, seed=st.integers(0, 2**31))
def test_ancestors_valid_and_never_zero_weight(scheme, values, seed):
    w = _w(values)
    gen = torch.Generator().manual_seed(seed)
    a = get_resampler(scheme)(w, gen)
    assert a.shape == w.shape and a.dtype == torch.long
    assert (a >= 0).all() and (a < w.numel()).all()
    assert (w[a] > 0).all(), "a zero-weight particle was selected"


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual"])
@settings(max_examples=60, deadline=None)
@given(values=weights_st, seed=st.integers(0, 2**31))
def test_low_variance_count_bounds(scheme, values, seed):
    """Systematic: counts in {floor(Nw), ceil(Nw)}; residual: counts >= floor(Nw);
    stratified: counts within floor(Nw)-1 .. ceil(Nw)+1."""
    w = _w(values)
    n = w.numel()
    a = get_resampler(scheme)(w, torch.Generator().manual_seed(seed))
    counts = torch.bincount(a, minlength=n).double()
    nw = n * w
    eps = 1e-9
    if scheme == "systematic":
        assert (counts >= torch.floor(nw - eps)).all() and (counts <= torch.ceil(nw + eps)).all()
    elif scheme == "residual":
        assert (counts >= torch.floor(nw - eps)).all()
    else:
        assert (counts >= torch.floor(nw) - 1).all() and (counts <= torch.ceil(nw) + 1).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbiased_counts(scheme):
    """E[#copies of i] = N w_i: the weighted-mean integral is preserved in expectation."""
    w = _w([0.02, 0.3, 0.0, 0.18, 0.05, 0.45])
    n, reps = w.numel(), 20000
    gen = torch.Generator().manual_seed(1)
    counts = torch.stack(
        [torch.bincount(get_resampler(scheme)(w, gen), minlength=n) for _ in range(reps)]
    ).double()
    mean, sd = counts.mean(0), counts.std(0)
    dev = (mean - n * w).abs()
    fixed = sd == 0  # deterministic counts must be exactly N w_i
    assert (dev[fixed] < 1e-9).all()
    z = dev[~fixed] / (sd[~fixed] / math.sqrt(reps))
    assert z.max() < z_threshold(n * len(SCHEMES))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_round_off(scheme):
    """Weights whose float32 sum falls short of 1 must not pick past the end or a zero weight."""
    w = torch.full((1000,), 1 / 1000, dtype=torch.float32)
    w[-1] = 0.0
    w = w * (1 - 1e-7)
    for s in range(50):
        a = get_resampler(scheme)(w, torch.Generator().manual_seed(s))
        assert (a < 999).all()


def test_single_particle_and_point_mass():
    for scheme in SCHEMES:
        gen = torch.Generator().manual_seed(0)
        assert get_resampler(scheme)(torch.ones(1, dtype=torch.float64), gen).tolist() == [0]
        point = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        assert get_resampler(scheme)(point, gen).tolist() == [1, 1, 1]


def test_unknown_scheme():
    with pytest.raises(InputError, match="resampler"):
        get_resampler("bogus")


batch_st = st.integers(1, 12).flatmap(
    lambda n: st.lists(
        st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n).filter(
            lambda r: sum(r) > 1e-6
        ),
        min_size=1,
        max_size=5,
    )
)


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=60, deadline=None)
@given(values=batch_st, seed=st.integers(0, 2**31))
def test_batched_systems_each_valid(scheme, values, seed):
    """[B, N] weights: each row is its own particle system (several prompts in one batch)."""
    w = torch.tensor(values, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    a = get_resampler(scheme)(w, torch.Generator().manual_seed(seed))
    assert a.shape == w.shape and a.dtype == torch.long
    n = w.shape[1]
    for row_w, row_a in zip(w, a, strict=True):
        assert (row_w[row_a] > 0).all()
        assert (row_a.diff() >= 0).all(), "ancestors of a system are sorted"
        if scheme != "multinomial":  # low-variance schemes keep about floor(N w) copies
            counts = torch.bincount(row_a, minlength=n).double()
            slack = int(scheme == "stratified")
            assert (counts >= torch.floor(n * row_w - 1e-9) - slack).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_batched_unbiased_counts(scheme):
    """E[#copies of i in system b] = N w_bi for every row of a [B, N] call."""
    w = torch.tensor([[0.02, 0.3, 0.0, 0.18, 0.05, 0.45],
                      [0.5, 0.0, 0.1, 0.1, 0.1, 0.2],
                      [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    (b, n), reps = w.shape, 20000
    gen = torch.Generator().manual_seed(2)
    draws = torch.stack([get_resampler(scheme)(w, gen) for _ in range(reps)])
    counts = torch.nn.functional.one_hot(draws, n).sum(-2).double()  # [reps, B, N]
    mean, sd = counts.mean(0), counts.std(0)
    dev = (mean - n * w).abs()
    fixed = sd == 0
    assert (dev[fixed] < 1e-9).all()
    z = dev[~fixed] / (sd[~fixed] / math.sqrt(reps))
    assert z.max() < z_threshold(b * n * len(SCHEMES))


# ---- chopthin (Gandy & Lau 2016): not equally weighted afterwards --------------------------

from powersmc.chopthin import ETA, _h_sum, chopthin, threshold  # noqa: E402


@settings(max_examples=80, deadline=None)
@given(values=batch_st, seed=st.integers(0, 2**31))
def test_chopthin_valid_bounded_and_weight_preserving(values, seed):
    """Per system: N sorted valid ancestors, never a zero weight; new weights within a ratio
    eta (so ESS >= N/2 for the default eta); every surviving chopped or kept particle carries
    exactly its old weight; the heaviest particle always survives."""
    w = torch.tensor(values, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    a, log_w = get_resampler("chopthin")(w, torch.Generator().manual_seed(seed))
    assert a.shape == w.shape == log_w.shape and a.dtype == torch.long
    n = w.shape[1]
    thr = threshold(w, n)  # solves sum_i h_a(w_i) = N (Gandy & Lau's defining equation)
    assert torch.allclose(_h_sum(w, thr, ETA), torch.full_like(thr, float(n)), rtol=1e-9)
    for row_w, row_a, row_lw in zip(w, a, log_w, strict=True):
        assert (row_a.diff() >= 0).all() and (row_w[row_a] > 0).all()
        new = row_lw.exp() / n
        assert torch.isfinite(row_lw).all()
        assert new.max() <= ETA * new.min() * (1 + 1e-9)
        ess = new.sum() ** 2 / (new**2).sum()
        assert ess >= n / 2 * (1 - 1e-9)
        assert row_w.argmax() in row_a
        counts = torch.bincount(row_a, minlength=n)
        for i in torch.nonzero(counts >= 2).flatten().tolist():  # chopped: weight kept exactly
            assert abs(float(new[row_a == i].sum()) - float(row_w[i])) < 1e-12


def test_chopthin_equal_weights_and_point_mass_are_fixed_points():
    gen = torch.Generator().manual_seed(0)
    a, lw = chopthin(torch.full((5,), 0.2, dtype=torch.float64), gen)
    assert a.tolist() == [0, 1, 2, 3, 4] and lw.abs().max() < 1e-12
    a, lw = chopthin(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), gen)
    assert a.tolist() == [1, 1, 1] and lw.abs().max() < 1e-12
    a, lw = chopthin(torch.ones(1, dtype=torch.float64), gen)
    assert a.tolist() == [0] and lw.tolist() == [0.0]
    with pytest.raises(ValueError, match="eta"):
        chopthin(torch.ones(1, dtype=torch.float64), gen, eta=3.0)


def test_chopthin_weighted_counts_are_unbiased():
    """E[sum_j W'_j 1{A_j = i}] = w_i for every particle of every system (the property SMC's
    unbiased evidence and weighted output rest on), z-tested over repetitions."""
    w = torch.tensor([[0.02, 0.3, 0.0, 0.18, 0.05, 0.45],
                      [0.5, 0.0, 0.1, 0.1, 0.1, 0.2],
                      [0.001, 0.004, 0.005, 0.09, 0.2, 0.7]], dtype=torch.float64)
    (b, n), reps = w.shape, 20000
    # reps x B independent systems in one call (rows never interact)
    a, lw = chopthin(w.repeat(reps, 1), torch.Generator().manual_seed(3))
    mass = torch.zeros((reps * b, n), dtype=torch.float64).scatter_add_(1, a, lw.exp() / n)
    mass = mass.view(reps, b, n)
    mean, sd = mass.mean(0), mass.std(0)
    dev = (mean - w).abs()
    fixed = sd < 1e-12
    assert (dev[fixed] < 1e-9).all()
    z = dev[~fixed] / (sd[~fixed] / math.sqrt(reps))
    print("chopthin weighted counts: max |z| =", float(z.max()))
    assert z.max() < z_threshold(b * n)


def test_chopthin_float32_round_off():
    w = torch.full((1000,), 1 / 1000, dtype=torch.float32)
    w[-1] = 0.0
    w = w * (1 - 1e-7)
    for s in range(20):
        a, lw = chopthin(w, torch.Generator().manual_seed(s))
        assert (a < 999).all() and a.numel() == 1000 and torch.isfinite(lw).all()
