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
