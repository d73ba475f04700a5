"""Power-SMC against pi_alpha enumerated exactly on toy LMs (issue 2, item 11).

For a fixed particle count the SMC output is only asymptotically distributed as pi_alpha; what
is exact for every N is the evidence-weighted output: E[Z_hat * 1{y_out = y}] = Z * pi_alpha(y).
So the primary test weights each run's output by its own Z_hat and z-tests every outcome. The
raw output is checked to approach pi_alpha as N grows and to beat low-temperature sampling.
"""

import math
from collections import Counter

import pytest
from stats import mean_z, num_cells, weighted_frequency_z, z_threshold
from toy_models import HORIZON, PROMPT, random_lm, trap_lm

from powersmc import smc_sample
from powersmc.exact import power_distribution, tempered_distribution, total_variation
from powersmc.methods.options import ORDERS
from powersmc.methods.smc import smc_program
from powersmc.runtime.api import run_programs

ALPHA = 4.0
RUNS = 3000
MODELS = {"trap": trap_lm, "random": random_lm}
# (model, resampler, ramp_tokens) configurations, all tested at once: Bonferroni over all.
CONFIGS = [(m, r, 0) for m in MODELS for r in ("systematic", "multinomial", "stratified",
                                                 "residual")]
CONFIGS += [(m, "systematic", 3) for m in MODELS]


def _results(lm, resampler, ramp, particles=8, runs=RUNS, seed0=0, **kw):
    """`runs` Power-SMC runs seeded seed0, seed0 + 1, ..., all in flight in one scheduler:
    each is bit-identical to `smc_sample(..., seed=seed0 + s)` alone on these batch-invariant
    models (test_scheduler), in a fraction of the time."""
    return run_programs(lm, [
        smc_program(lm, PROMPT, alpha=ALPHA, particles=particles, max_new_tokens=HORIZON,
                    resampler=resampler, ramp_tokens=ramp, seed=seed0 + s, **kw)
        for s in range(runs)])


def _tokens_and_log_z(out):
    return [tuple(r.token_ids) for r in out], [r.log_z for r in out]


def _runs(lm, resampler, ramp, **kw):
    return _tokens_and_log_z(_results(lm, resampler, ramp, **kw))


def _assert_exact(out, pi, log_z_true, tests, label):
    """The evidence-weighted output of the runs `out` is pi_alpha (a z-test per outcome) and
    exp(log_z) is unbiased for Z, each Bonferroni-corrected over `tests` parametrisations."""
    draws, log_zs = _tokens_and_log_z(out)
    z_hat = [math.exp(v - log_z_true) for v in log_zs]
    est, worst = weighted_frequency_z(draws, z_hat, pi)
    threshold = z_threshold(num_cells(pi, len(draws)) * tests)
    assert worst < threshold, f"max |z| {worst:.2f} >= {threshold:.2f}"
    assert mean_z(z_hat, 1.0) < z_threshold(tests)
    print(f"{label}: TV(weighted, pi) = {total_variation(est, pi):.4f}, max |z| = {worst:.2f}, "
          f"mean Z_hat/Z = {sum(z_hat) / len(z_hat):.4f}")


@pytest.mark.parametrize("model,resampler,ramp", CONFIGS)
def test_evidence_weighted_output_is_exact(model, resampler, ramp):
    lm = MODELS[model]()
    pi, log_z_true = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    _assert_exact(_results(lm, resampler, ramp), pi, log_z_true, len(CONFIGS),
                  f"{model}/{resampler}/ramp={ramp}")


@pytest.mark.parametrize("model", MODELS)
def test_raw_output_converges_and_beats_low_temperature(model):
    """The drawn answer itself: its O(1/N) bias shrinks with N; at N = 256 it passes the same
    goodness-of-fit test; low-temperature sampling is far off (exact TV, no Monte Carlo)."""
    lm = MODELS[model]()
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    tv_low = total_variation(tempered_distribution(lm, PROMPT, HORIZON, 1 / ALPHA), pi)
    tvs, runs = {}, 1000
    for n in (4, 256):
        draws, _ = _runs(lm, "systematic", 0, particles=n, runs=runs, seed0=10_000)
        emp = {k: v / runs for k, v in Counter(draws).items()}
        tvs[n] = total_variation(emp, pi)
        if n == 256:
            _, worst = weighted_frequency_z(draws, [1.0] * runs, pi)
            assert worst < z_threshold(num_cells(pi, runs) * len(MODELS))
    print(f"{model}: TV(low-temp, pi) = {tv_low:.4f}; TV(SMC raw, pi) by N = {tvs}")
    assert tvs[256] < tvs[4]
    assert tvs[256] < tv_low / 3


def test_truncation_targets_truncated_model():
    """With top_k the weighted output is exact for the truncated model's power (and warned)."""
    import warnings

    from powersmc import FunctionLM, TruncatedTargetWarning
    from powersmc.proposals import truncate_logprobs

    base = trap_lm()

    def truncated(prefix):

        return truncate_logprobs(base._logprobs(prefix)[None].double(), top_k=2)[0]

    lm_trunc = FunctionLM(truncated, 4, [0])
    pi, log_z_true = power_distribution(lm_trunc, PROMPT, HORIZON, ALPHA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draws, log_zs = _runs(base, "systematic", 0, runs=1500, top_k=2)
    assert any(issubclass(w.category, TruncatedTargetWarning) for w in caught)
    z_hat = [math.exp(v - log_z_true) for v in log_zs]
    _, worst = weighted_frequency_z(draws, z_hat, pi)
    assert worst < z_threshold(num_cells(pi, len(draws)))


def test_ramp_longer_than_generation_is_still_exact():
    """Particles that finish before the ramp ends get the remaining bridge at the end."""
    lm = trap_lm()
    pi, log_z_true = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    draws, log_zs = _runs(lm, "systematic", 50, runs=2000, seed0=777)
    z_hat = [math.exp(v - log_z_true) for v in log_zs]
    _, worst = weighted_frequency_z(draws, z_hat, pi)
    assert worst < z_threshold(num_cells(pi, len(draws)))


def test_several_prompts_in_one_batch_are_each_exact():
    """smc_sample_many: P prompts x N particles, each prompt its own particle system. Every
    prompt's evidence-weighted output must match its own pi_alpha, and its evidence be unbiased,
    while the prompts share forward passes (and one generator)."""
    from powersmc import smc_sample_many

    lm = random_lm()
    prompts = [[3], [2], [1]]
    runs = 2000
    out = [smc_sample_many(lm, prompts, alpha=ALPHA, particles=8, max_new_tokens=HORIZON,
                           seed=50_000 + s) for s in range(runs)]
    targets = [power_distribution(lm, p, HORIZON, ALPHA) for p in prompts]
    cells = sum(num_cells(pi, runs) for pi, _ in targets)
    for g, (pi, log_z_true) in enumerate(targets):
        draws = [tuple(batch[g].token_ids) for batch in out]
        z_hat = [math.exp(batch[g].log_z - log_z_true) for batch in out]
        est, worst = weighted_frequency_z(draws, z_hat, pi)
        assert worst < z_threshold(cells), f"prompt {prompts[g]}: max |z| {worst:.2f}"
        assert mean_z(z_hat, 1.0) < z_threshold(len(prompts))
        print(f"prompt {prompts[g]}: TV(weighted, pi) = {total_variation(est, pi):.4f}")
    # the three targets differ, so a mix-up between systems could not pass
    assert min(total_variation(targets[0][0], t[0]) for t in targets[1:]) > 0.1


def _batched_runs(lm, runs, batch=500, seed0=0, **kw):
    """`runs` independent Power-SMC runs, `batch` at a time as independent particle systems in
    one `Scheduler` batch, run k seeded seed0 + k: each run is then exactly
    `smc_sample(..., seed=seed0 + k)` (each system has its own generator; FunctionLM is
    batch-invariant), the per-run tests' convention."""
    from powersmc import Scheduler

    out = []
    for k in range(0, runs, batch):
        sched = Scheduler(lm)
        handles = [sched.submit(PROMPT, alpha=ALPHA, max_new_tokens=HORIZON, seed=seed0 + j,
                                **kw) for j in range(k, min(k + batch, runs))]
        sched.run()
        out += [h.result() for h in handles]
    return out


@pytest.mark.parametrize("model", MODELS)
def test_chopthin_resampling_is_exact(model):
    """resampler='chopthin' leaves particles unequally weighted after resampling; with the
    weights it returns, the evidence-weighted output is still exactly pi_alpha and exp(log_z)
    unbiased. kappa = 1 makes it fire whenever the weights are uneven."""
    lm = MODELS[model]()
    pi, log_z_true = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    out = _batched_runs(lm, RUNS, particles=8, resampler="chopthin", ess_threshold=1.0,
                        seed0=90_000)
    assert sum(bool(r.resample_steps) for r in out) > RUNS / 2
    _assert_exact(out, pi, log_z_true, len(MODELS), f"{model}/chopthin")


@pytest.mark.parametrize("model", MODELS)
def test_rounds_evidence_weighted_output_is_exact(model):
    """rounds=R: the answer drawn in proportion to Z_hat_r * W_r^i and weighted by the combined
    evidence (1/R) sum_r Z_hat_r is exactly pi_alpha, and that evidence is unbiased."""
    lm = MODELS[model]()
    pi, log_z_true = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    out = _batched_runs(lm, RUNS, particles=4, rounds=3, seed0=70_000)
    assert all(r.stats["rounds"] == 3 and len(r.particles) == 12 for r in out)
    assert len({r.stats["round"] for r in out}) == 3
    _assert_exact(out, pi, log_z_true, len(MODELS), f"{model}/rounds=3")


def test_rounds_raw_output_converges():
    """With N = 4 the raw draw of one round is far from pi_alpha on the trap model; combining
    32 rounds by their evidence brings it close enough to pass the goodness-of-fit test."""
    model = "trap"
    lm = MODELS[model]()
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    runs, tvs = 600, {}
    for r in (1, 32):
        draws = [tuple(x.token_ids) for x in _batched_runs(lm, runs, particles=4, rounds=r,
                                                            seed0=20_000)]
        tvs[r] = total_variation({k: v / runs for k, v in Counter(draws).items()}, pi)
        if r == 32:
            _, worst = weighted_frequency_z(draws, [1.0] * runs, pi)
            assert worst < z_threshold(num_cells(pi, runs))
    print(f"{model}: TV(raw, pi) with N = 4 by rounds = {tvs}")
    assert tvs[32] < tvs[1] / 2


ADAPTED = [(m, r, ramp, kappa) for m in MODELS for r, ramp, kappa in
           (("systematic", 0, 1.0), ("multinomial", 3, 1.0), ("chopthin", 0, 1.0))]


@pytest.mark.parametrize("model,resampler,ramp,kappa", ADAPTED)
def test_adapted_order_is_exact(model, resampler, ramp, kappa):
    """order='adapted' (reweight and resample before the draw; copies draw afresh): the
    evidence-weighted output is exactly pi_alpha and exp(log_z) unbiased, with the alpha-ramp,
    EOS absorption and an unequally weighted resampler. kappa = 1 resamples at almost every
    step, so the redraw path runs on nearly every token."""
    lm = MODELS[model]()
    pi, log_z_true = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    out = _batched_runs(lm, RUNS, particles=8, order="adapted", resampler=resampler,
                        ramp_tokens=ramp, ess_threshold=kappa, seed0=120_000)
    assert sum(bool(r.resample_steps) for r in out) > RUNS / 2
    _assert_exact(out, pi, log_z_true, len(ADAPTED),
                  f"{model}/adapted/{resampler}/ramp={ramp}")


def test_adapted_order_raw_output_converges():
    """The adapted order's raw draw passes the goodness-of-fit test at N = 256, like the
    standard order's (test above)."""
    lm = trap_lm()
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    runs = 1000
    draws = [tuple(r.token_ids) for r in _batched_runs(lm, runs, batch=100, particles=256,
                                                        order="adapted", seed0=130_000)]
    _, worst = weighted_frequency_z(draws, [1.0] * runs, pi)
    assert worst < z_threshold(num_cells(pi, runs))


def test_adapted_order_keeps_more_distinct_particles():
    """The standard order's copies of a resampled particle share its token y_t; the adapted
    order's copies draw y_t independently, so its final particle systems hold more distinct
    sequences. Multinomial resampling at every step (many copies), alpha = 1.5 (a proposal far
    from a point mass): the mean number of distinct final particles over 1000 systems, compared
    by a z-test on the difference of the means."""
    from statistics import fmean, variance

    from powersmc import smc_sample_many

    lm = random_lm()
    distinct = {}
    for order in ORDERS:
        out = smc_sample_many(lm, [PROMPT] * 1000, alpha=1.5, particles=8,
                              max_new_tokens=HORIZON, ess_threshold=1.0,
                              resampler="multinomial", order=order, seed=140_000)
        distinct[order] = [len({tuple(p.token_ids) for p in r.particles}) for r in out]
    std, ada = distinct["standard"], distinct["adapted"]
    z = (fmean(ada) - fmean(std)) / math.sqrt((variance(ada) + variance(std)) / 1000)
    print(f"distinct final particles (N = 8): standard {fmean(std):.3f}, "
          f"adapted {fmean(ada):.3f}, z = {z:.1f}")
    assert z > z_threshold(1)


ALIGNED = [("trap", "standard", "systematic", 0), ("random", "adapted", "multinomial", 3)]


@pytest.mark.parametrize("model,order,resampler,ramp", ALIGNED)
def test_aligned_resampling_is_exact(model, order, resampler, ramp):
    """resample_align=B (resampling deferred to steps where prompt + generated length is 1 mod
    B, vLLM's recompute-free copies): the schedule depends on the past only, so the
    evidence-weighted output stays exactly pi_alpha and exp(log_z) unbiased. With kappa = 1
    the ESS asks at almost every step; B = 2 and a 1-token prompt allow only even steps."""
    lm = MODELS[model]()
    pi, log_z_true = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    out = _batched_runs(lm, RUNS, particles=8, order=order, resampler=resampler,
                        ramp_tokens=ramp, ess_threshold=1.0, resample_align=2, seed0=150_000)
    steps = [t for r in out for t in r.resample_steps]
    assert len(steps) > RUNS and all((len(PROMPT) + t - 1) % 2 == 0 for t in steps)
    _assert_exact(out, pi, log_z_true, len(ALIGNED),
                  f"{model}/{order}/align=2")


def test_default_schedule_is_algorithm_1_where_copies_are_free():
    """The default resample_align='block' takes the engine's fork_block: 1 on engines that
    copy a row with its cache, so there the default run is Algorithm 1's, bit for bit."""
    for lm in (trap_lm(), random_lm()):
        kw = dict(particles=8, max_new_tokens=HORIZON, ess_threshold=1.0, seed=11)
        a, b = smc_sample(lm, PROMPT, **kw), smc_sample(lm, PROMPT, resample_align=1, **kw)
        assert a.resample_steps and a.resample_steps == b.resample_steps
        assert (a.token_ids, a.log_z, a.ess) == (b.token_ids, b.log_z, b.ess)
        assert a.stats["resample_align"] == 1


def test_resample_align_is_checked():
    from powersmc.errors import InputError

    for bad in (0, -2, 1.5, True, "blocks"):
        with pytest.raises(InputError, match="resample_align"):
            smc_sample(trap_lm(), PROMPT, max_new_tokens=HORIZON, resample_align=bad)
