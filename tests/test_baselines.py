"""Baselines against exact enumeration (issue 3, item 5) and their contracts."""

import math
from collections import Counter

import pytest
import torch
from stats import mean_z, num_cells, weighted_frequency_z, z_threshold
from toy_models import HORIZON, PROMPT, random_lm, trap_lm

from powersmc import InputError, bon_sample, mh_sample, sample, scalable_power_sample, smc_sample
from powersmc.exact import power_distribution, tempered_distribution, total_variation
from powersmc.methods.mh import mh_program
from powersmc.methods.program import Continue
from powersmc.methods.spower import power_conditional
from powersmc.results import SampleResult
from powersmc.runtime.api import run_method, run_programs

ALPHA = 4.0


def _emp(draws):
    return {k: v / len(draws) for k, v in Counter(draws).items()}


@pytest.mark.parametrize("make", [trap_lm, random_lm])
def test_low_temperature_is_the_token_level_product(make):
    lm = make()
    low = tempered_distribution(lm, PROMPT, HORIZON, 1 / ALPHA)
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    r = sample(lm, PROMPT, temperature=1 / ALPHA, num_samples=5000, max_new_tokens=HORIZON, seed=0)
    draws = [tuple(s) for s in r.samples]
    _, worst = weighted_frequency_z(draws, [1.0] * len(draws), low)
    assert worst < z_threshold(num_cells(low, len(draws)) * 2)
    mc_floor = 0.5 * sum(math.sqrt(p * (1 - p) / len(draws)) for p in pi.values())
    print(f"{make.__name__}: TV(low-temp, pi) = {total_variation(low, pi):.4f}")
    assert total_variation(_emp(draws), pi) > 5 * mc_floor


def test_greedy_is_the_argmax_path():
    lm = trap_lm()
    r = sample(lm, PROMPT, greedy=True, num_samples=3, max_new_tokens=HORIZON, seed=0)
    assert r.method == "greedy" and r.samples == [[2, 0]] * 3


def _mh_tv(lm, moves, mode, runs, T=HORIZON, blocks=2, seed0=0):
    """`runs` independent MH chains, all in flight in one scheduler."""
    chains = [mh_program(lm, PROMPT, alpha=ALPHA, max_new_tokens=T, num_blocks=blocks,
                         mh_moves=moves, mode=mode, seed=seed0 + s) for s in range(runs)]
    return [tuple(r.token_ids) for r in run_programs(lm, chains)]


def test_exact_mh_converges_to_pi():
    """TV to pi falls with the number of moves; on a short horizon the chain passes the
    goodness-of-fit test against pi."""
    lm = trap_lm()
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    tvs = {m: total_variation(_emp(_mh_tv(lm, m, "exact", 600)), pi) for m in (0, 4, 24)}
    print("exact MH TV by moves per block:", tvs)
    assert tvs[0] > tvs[4] > tvs[24]
    pi2, _ = power_distribution(lm, PROMPT, 2, ALPHA)
    draws = _mh_tv(lm, 20, "exact", 1500, T=2, blocks=1, seed0=50_000)
    _, worst = weighted_frequency_z(draws, [1.0] * len(draws), pi2)
    assert worst < z_threshold(num_cells(pi2, len(draws)))


def test_faithful_mh_bias_is_measured():
    """The published kernel (no index correction, truncated comparison, early return) does not
    converge to pi on the trap model: more moves do not bring it closer."""
    lm = trap_lm()
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    exact = total_variation(_emp(_mh_tv(lm, 24, "exact", 600, seed0=1)), pi)
    faithful = total_variation(_emp(_mh_tv(lm, 24, "faithful", 600, seed0=1)), pi)
    print(f"TV to pi after 24 moves/block: exact {exact:.3f}, faithful {faithful:.3f}")
    assert faithful > exact + 0.2


def _spower_bias(lm, m, jackknife, reps=1000):
    """L1 distance between the mean estimated first-token conditional over `reps` independent
    runs (each its own generator, all in flight in one scheduler) and the exact one."""
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    exact = torch.tensor([sum(v for k, v in pi.items() if k[0] == t) for t in range(4)],
                         dtype=torch.float64)
    eos = torch.tensor(lm.eos_token_ids)

    def first_token(gen):  # a program: the estimated conditional of the first token
        (r,) = yield [Continue(PROMPT, 1, 1, gen, keep_logp=True)]
        cand, p, _ = yield from power_conditional(
            list(PROMPT), r.first_logp, eos, alpha=ALPHA, candidates=4, rollouts=m,
            horizon=HORIZON - 1, jackknife=jackknife, generator=gen)
        return SampleResult("conditional", "", [], 0, stats={"cand": cand, "p": p})

    acc = torch.zeros(4, dtype=torch.float64)
    for r in run_programs(lm, [first_token(torch.Generator().manual_seed(1000 * m + k))
                               for k in range(reps)]):
        acc[r.stats["cand"]] += r.stats["p"]
    return float((acc / reps - exact).abs().sum())


def test_scalable_power_bias_shrinks_with_m_and_jackknife():
    lm = trap_lm()
    b = {(m, jk): _spower_bias(lm, m, jk) for m in (2, 4, 16) for jk in (False, True)}
    print("Ji et al. L1 bias of the first-token conditional:", b)
    assert b[(2, False)] > b[(4, False)] > b[(16, False)]
    assert b[(2, True)] > b[(4, True)] > b[(16, True)]
    for m in (4, 16):
        assert b[(m, True)] < b[(m, False)]


@pytest.mark.parametrize(
    "call",
    [
        lambda lm: sample(lm, PROMPT, temperature=0.3, num_samples=4, max_new_tokens=4, seed=5),
        lambda lm: mh_sample(lm, PROMPT, max_new_tokens=4, num_blocks=2, mh_moves=3, seed=5),
        lambda lm: mh_sample(lm, PROMPT, max_new_tokens=4, num_blocks=2, mh_moves=3, seed=5,
                             mode="faithful"),
        lambda lm: scalable_power_sample(lm, PROMPT, max_new_tokens=4, rollouts=3, seed=5),
        lambda lm: bon_sample(lm, PROMPT, num_samples=6, max_new_tokens=4, seed=5),
    ],
)
def test_seeded_and_global_rng_untouched(call):
    lm = random_lm()
    rng = torch.get_rng_state()
    a, b = call(lm), call(lm)
    assert torch.equal(rng, torch.get_rng_state())
    assert a.token_ids == b.token_ids and a.stats == b.stats
    assert a.cost.token_evals == b.cost.token_evals > 0


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda lm: sample(lm, PROMPT, temperature=0.0), "temperature"),
        (lambda lm: sample(lm, PROMPT, num_samples=0), "num_samples"),
        (lambda lm: mh_sample(lm, PROMPT, mode="bogus"), "mode"),
        (lambda lm: mh_sample(lm, PROMPT, mh_moves=-1), "mh_moves"),
        (lambda lm: mh_sample(lm, PROMPT, alpha=0.9), "alpha"),
        (lambda lm: scalable_power_sample(lm, PROMPT, rollouts=0), "rollouts"),
        (lambda lm: scalable_power_sample(lm, PROMPT, max_new_tokens=0), "max_new_tokens"),
        (lambda lm: bon_sample(lm, PROMPT, num_samples=0), "num_samples"),
        (lambda lm: bon_sample(lm, PROMPT, alpha=0.5), "alpha"),
        (lambda lm: bon_sample(lm, PROMPT, select="best"), "select"),
    ],
)
def test_bad_input(call, arg):
    with pytest.raises(InputError, match=f"^{arg}:"):
        call(random_lm())


@pytest.mark.model
def test_every_method_runs_on_default_model(default_lm):
    q = "What is 3 + 4?"
    runs = [
        sample(default_lm, q, max_new_tokens=12, seed=0),
        sample(default_lm, q, temperature=0.25, num_samples=3, max_new_tokens=12, seed=0),
        sample(default_lm, q, greedy=True, max_new_tokens=12),
        mh_sample(default_lm, q, max_new_tokens=12, num_blocks=2, mh_moves=2, seed=0),
        mh_sample(default_lm, q, max_new_tokens=12, num_blocks=2, mh_moves=2, seed=0,
                  mode="faithful"),
        scalable_power_sample(default_lm, q, max_new_tokens=4, candidates=3, rollouts=2, horizon=3,
                              seed=0),
        bon_sample(default_lm, q, num_samples=3, max_new_tokens=12, seed=0),
        *(run_method(m, default_lm, q, alpha=4.0, max_new_tokens=12, seed=0, particles=4,
                     ess_threshold=0.9, num_blocks=2, mh_moves=2, stage_tokens=6)
          for m in ("maj", "smc-rm", "ccps", "ppt", "ecmh")),
    ]
    for r in runs:
        assert r.token_ids and r.cost.seconds > 0 and r.cost.token_evals > 0
        assert len(r.token_ids) <= 12


def test_shared_options_never_truncate_smc():
    """One option set drives every method in an evaluation: Ji et al.'s K must not reach
    smc_sample as a truncation (regression: it once did, under the name top_k)."""
    import warnings

    from powersmc.proposals import TruncatedTargetWarning
    from powersmc.runtime.api import run_method

    opts = {"particles": 4, "candidates": 2, "rollouts": 2, "horizon": 2, "num_blocks": 2,
            "mh_moves": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncatedTargetWarning)
        for method in ("smc", "smc-adapted", "spower", "mh", "plain", "lowtemp", "bon"):
            run_method(method, random_lm(), PROMPT, alpha=ALPHA, max_new_tokens=3, seed=0, **opts)


def test_shared_options_reach_each_method():
    """The options a method declares do reach it, also through forwarding entry points."""
    from powersmc import Scheduler
    from powersmc.methods.registry import method_program
    from powersmc.runtime.api import run_method

    opts = {"particles": 3, "num_blocks": 2, "candidates": 2, "rollouts": 2, "horizon": 2}
    r = run_method("smc", random_lm(), PROMPT, alpha=ALPHA, max_new_tokens=3, seed=0, **opts)
    assert r.num_particles == 3 and len(r.particles) == 3
    bon = run_method("bon", random_lm(), PROMPT, alpha=ALPHA, max_new_tokens=3, seed=0, **opts)
    assert bon.num_particles == 3  # best-of-N defaults to the SMC particle count
    bon = run_method("bon", random_lm(), PROMPT, alpha=ALPHA, max_new_tokens=3, seed=0,
                     bon_samples=5, **opts)
    assert bon.num_particles == 5 and len(bon.samples) == 5
    lm = random_lm()
    sched = Scheduler(lm)
    many = [sched.start(method_program("smc", lm, p, alpha=ALPHA, max_new_tokens=3, seed=0,
                                       **opts)) for p in (PROMPT, [2])]
    sched.run()
    assert [len(h.result().particles) for h in many] == [3, 3]
    # 'smc-adapted' is Power-SMC with order='adapted', whatever order the options name
    same = [run_method(m, random_lm(), PROMPT, alpha=ALPHA, max_new_tokens=3, seed=0, **o)
            for m, o in (("smc-adapted", {**opts, "order": "standard"}),
                         ("smc", {**opts, "order": "adapted"}))]
    assert same[0].token_ids == same[1].token_ids and same[0].log_z == same[1].log_z


def test_smc_adapted_method_is_smc_in_the_adapted_order():
    """'smc-adapted' is Power-SMC with order='adapted' and the shared options (an evaluation
    runs both orders side by side): same seed, same particles; an `order` option cannot
    turn it back to the standard order (seed 0 resamples, and there the orders differ)."""
    from powersmc.runtime.api import run_method

    opts = {"particles": 6, "num_blocks": 2, "order": "standard"}
    r = run_method("smc-adapted", trap_lm(), PROMPT, alpha=ALPHA, max_new_tokens=HORIZON,
                   seed=0, **opts)
    ref = smc_sample(trap_lm(), PROMPT, alpha=ALPHA, particles=6, max_new_tokens=HORIZON,
                     seed=0, order="adapted")
    std = smc_sample(trap_lm(), PROMPT, alpha=ALPHA, particles=6, max_new_tokens=HORIZON,
                     seed=0)
    assert [p.token_ids for p in r.particles] == [p.token_ids for p in ref.particles]
    assert r.log_z == ref.log_z and r.text == ref.text
    assert [p.token_ids for p in r.particles] != [p.token_ids for p in std.particles]


# ---- importance-resampled best-of-N -----------------------------------------------------------


@pytest.mark.parametrize("make", [trap_lm, random_lm])
def test_bon_weights_are_exact_importance_weights(make):
    """One call with many samples: every weight is exactly (alpha - 1) log p(y) of its sample,
    the self-normalised estimate (eq. 5) over the samples passes the z-test against pi_alpha,
    and exp(log_z) = mean p(y_i)^(alpha - 1) is unbiased for Z_alpha."""
    lm, n = make(), 20_000
    pi, log_z_true = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    base, _ = power_distribution(lm, PROMPT, HORIZON, 1.0)  # p itself (alpha = 1, Z = 1)
    r = bon_sample(lm, PROMPT, alpha=ALPHA, num_samples=n, max_new_tokens=HORIZON, seed=11)
    draws = [tuple(p.token_ids) for p in r.particles]
    assert all(abs(p.log_weight - (ALPHA - 1) * math.log(base[y])) < 1e-5
               for p, y in zip(r.particles, draws, strict=True))
    w = [math.exp(p.log_weight - log_z_true) for p in r.particles]
    est, worst = weighted_frequency_z(draws, w, pi)
    assert worst < z_threshold(num_cells(pi, n) * 2)
    assert mean_z(w, 1.0) < z_threshold(2)
    assert abs(math.exp(r.log_z - log_z_true) - sum(w) / n) < 1e-9
    print(f"{make.__name__}: N = {n}, TV(SNIS, pi) = {total_variation(est, pi):.4f}, "
          f"max |z| = {worst:.2f}")


def test_bon_draw_is_exact_with_evidence_and_converges():
    """The drawn answer: weighted by its own Z_hat it is exactly pi_alpha even at N = 2 (z-test);
    unweighted, its TV to pi_alpha falls with N, and at N = 128 it passes the z-test."""
    lm, T, runs = trap_lm(), 2, 600
    pi, log_z_true = power_distribution(lm, PROMPT, T, ALPHA)
    tvs = {}
    for n in (2, 128):
        out = [bon_sample(lm, PROMPT, alpha=ALPHA, num_samples=n, max_new_tokens=T,
                          seed=60_000 + s) for s in range(runs)]
        draws = [tuple(r.token_ids) for r in out]
        tvs[n] = total_variation(_emp(draws), pi)
        if n == 2:
            z_hat = [math.exp(r.log_z - log_z_true) for r in out]
            _, worst = weighted_frequency_z(draws, z_hat, pi)
            assert worst < z_threshold(num_cells(pi, runs) * 2)
        else:
            _, worst = weighted_frequency_z(draws, [1.0] * runs, pi)
            assert worst < z_threshold(num_cells(pi, runs) * 2)
        assert all(r.cost.token_evals > 0 and r.cost.prefill_tokens == 1 for r in out)
    print(f"best-of-N raw TV to pi by N: {tvs}")
    assert tvs[128] < tvs[2] / 2
