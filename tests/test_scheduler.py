"""`powersmc.Scheduler`: particle systems that join and leave the running batch at every token.

Exactness through the scheduler: systems with different alpha, N, kappa, resamplers, orders,
ramps and horizons join one running batch at different steps, some are cancelled mid-run; each
finished system's evidence-weighted output must equal its own pi_alpha, enumerated exactly, and
its evidence be unbiased (z-tests, Bonferroni over every comparison: `stats`). On a
batch-invariant model (`FunctionLM`) a seeded system is bit-identical alone and in a busy batch.
"""

import math
from collections import defaultdict

import pytest
from stats import mean_z, num_cells, weighted_frequency_z, z_threshold
from toy_models import HORIZON, PROMPT, random_lm, trap_lm

from powersmc import InputError, Scheduler, smc_sample
from powersmc.exact import power_distribution, total_variation
from powersmc.runtime.scheduler import Cancelled

# (alpha, particles, kappa, resampler, order, ramp_tokens, max_new_tokens)
MIXED = [
    (4.0, 8, 0.5, "systematic", "standard", 0, HORIZON),
    (2.0, 4, 0.9, "chopthin", "standard", 0, HORIZON),
    (4.0, 6, 0.7, "residual", "standard", 3, HORIZON),
    (3.0, 8, 0.9, "stratified", "adapted", 0, HORIZON),
    (4.0, 5, 1.0, "multinomial", "standard", 0, HORIZON - 1),
]


def _opts(cfg):
    alpha, n, kappa, resampler, order, ramp, T = cfg
    return dict(alpha=alpha, particles=n, ess_threshold=kappa, resampler=resampler, order=order,
                ramp_tokens=ramp, max_new_tokens=T)


def test_mixed_systems_joining_at_every_step_are_each_exact():
    """A stream of systems with five different settings joins one scheduler, a few per step,
    so every batch mixes systems at different tokens; every 9th system is cancelled one step
    after it joined (a rule blind to its particles). Each setting's finished systems must be
    exact for that setting's own pi_alpha (over EOS-ended sequences of length <= T and
    unfinished prefixes of length T)."""
    lm = random_lm()
    sched = Scheduler(lm)
    runs = 1500  # per setting
    handles: dict[int, list] = defaultdict(list)
    cancel_next: list = []
    k = 0
    while k < runs * len(MIXED) or not sched.idle:
        for h in cancel_next:
            h.cancel()
        cancel_next = []
        for _ in range(7 if k < runs * len(MIXED) else 0):
            c = k % len(MIXED)
            h = sched.submit(PROMPT, seed=90_000 + k, **_opts(MIXED[c]))
            (cancel_next if k % 9 == 4 else handles[c]).append(h)
            k += 1
        sched.step()
        assert sched.live_rows <= sum(cfg[1] for cfg in MIXED) * 7 * (HORIZON + 1)
    cancelled = [h for h in cancel_next if h.done]
    assert all(h.done for hs in handles.values() for h in hs)
    tests = 0
    targets = {}
    for c, cfg in enumerate(MIXED):
        pi, log_z = power_distribution(lm, PROMPT, cfg[6], cfg[0])
        targets[c] = (pi, log_z)
        tests += num_cells(pi, len(handles[c]))
    for c, cfg in enumerate(MIXED):
        pi, log_z_true = targets[c]
        out = [h.result() for h in handles[c]]
        draws = [tuple(r.token_ids) for r in out]
        z_hat = [math.exp(r.log_z - log_z_true) for r in out]
        est, worst = weighted_frequency_z(draws, z_hat, pi)
        assert worst < z_threshold(tests), f"{cfg}: max |z| {worst:.2f}"
        assert mean_z(z_hat, 1.0) < z_threshold(len(MIXED)), cfg
        print(f"{cfg}: TV(weighted, pi) = {total_variation(est, pi):.4f}")
    assert not cancelled or all(isinstance(h.error, Cancelled) for h in cancelled)


def test_seeded_system_is_bit_identical_alone_and_in_a_busy_batch():
    lm = trap_lm()
    kw = dict(alpha=4.0, particles=8, max_new_tokens=HORIZON + 3, ess_threshold=0.9)
    for seed in range(20):
        alone = smc_sample(lm, PROMPT, seed=seed, **kw)
        sched = Scheduler(lm)
        others = [sched.submit(PROMPT, seed=1000 + seed, alpha=2.0, particles=5,
                               resampler="chopthin", max_new_tokens=HORIZON)]
        sched.step()  # the seeded system joins a batch that is already running
        mine = sched.submit(PROMPT, seed=seed, **kw)
        others.append(sched.submit(PROMPT, seed=2000 + seed, particles=3, order="adapted",
                                   max_new_tokens=2 * HORIZON, ess_threshold=1.0))
        sched.run()
        busy = mine.result()
        assert busy.token_ids == alone.token_ids and busy.log_z == alone.log_z
        assert busy.ess == alone.ess and busy.resample_steps == alone.resample_steps
        assert [p.log_weight for p in busy.particles] == [p.log_weight for p in alone.particles]
        assert all(h.done and h.error is None for h in others)


def test_cancel_frees_rows_at_the_next_step():
    lm = random_lm()
    sched = Scheduler(lm)
    keep = sched.submit(PROMPT, seed=1, particles=4, max_new_tokens=50, ess_threshold=1.0)
    drop = sched.submit(PROMPT, seed=2, particles=6, max_new_tokens=50)
    sched.step()
    assert sched.live_rows <= 10 and len(sched.live) == 2
    drop.cancel()
    sched.step()
    assert len(sched.live) <= 1 and sched.engine.counts == [sched.live[0].rows] if sched.live \
        else True
    assert drop.done and isinstance(drop.error, Cancelled)
    with pytest.raises(Cancelled):
        drop.result()
    sched.run()
    assert keep.done and keep.error is None and keep.result().num_particles == 4
    assert sched.engine.state is None  # the empty batch holds no state


def test_limits_queue_systems_in_arrival_order():
    lm = trap_lm()
    sched = Scheduler(lm, max_rows=10, max_systems=2)
    hs = [sched.submit(PROMPT, seed=s, particles=4, max_new_tokens=HORIZON) for s in range(5)]
    sched.step()
    assert len(sched.live) == 2 and len(sched.waiting) == 3
    seen = 0
    while not sched.idle:
        sched.step()
        assert len(sched.live) <= 2 and sched.live_rows <= 10
        seen = max(seen, len(sched.live))
    assert all(h.done and h.error is None for h in hs) and seen == 2
    with pytest.raises(InputError, match="^particles:"):
        sched.submit(PROMPT, particles=11)


def test_a_state_holds_its_row_limit_and_three_states_run_in_one_step():
    """An engine state holds at most the model's `max_rows` rows (llama.cpp: 256 sequences
    of a context): systems beyond it open a second and a third state in the same step, one
    forward each; a system that would open a fourth waits until one drains. Each seeded
    system is bit-identical to its solo run (`FunctionLM`); a request larger than one state
    is refused."""
    from toy_models import row_limited

    lm = random_lm()
    sizes = row_limited(lm, 8)
    sched = Scheduler(lm)
    kw = dict(alpha=4.0, particles=4, max_new_tokens=6, ess_threshold=0.9)
    hs = [sched.submit(PROMPT, seed=s, **kw) for s in range(8)]
    sched.step()
    assert len(sched.live) == 6 and len(sched.waiting) == 2
    assert sizes == [8, 8, 8] and len(sched.engine.segments) == 3  # three prefills of 8 rows
    sched.run()
    assert max(sizes) == 8
    for s, h in enumerate(hs):
        alone = smc_sample(random_lm(), PROMPT, seed=s, **kw)
        assert h.result().token_ids == alone.token_ids and h.result().log_z == alone.log_z
    with pytest.raises(InputError, match="^particles: at most 8"):
        sched.submit(PROMPT, particles=9)


def test_bad_options_are_refused_at_submit():
    sched = Scheduler(trap_lm())
    for bad, name in [(dict(alpha=0.5), "alpha"), (dict(particles=0), "particles"),
                      (dict(resampler="nope"), "resampler"), (dict(order="x"), "order"),
                      (dict(rounds=0), "rounds"), (dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(resample_align=0), "resample_align")]:
        with pytest.raises(InputError, match=f"^{name}:"):
            sched.submit(PROMPT, **bad)
    assert sched.idle


def test_a_failing_system_leaves_the_others_running():
    """A proposal whose mass lies where the model has none gives every particle weight zero:
    that request fails with DegenerateWeightsError, the others in the batch finish."""
    import torch

    from powersmc import DegenerateWeightsError, FunctionLM

    lm = FunctionLM(lambda prefix: [0.0, 0.0, 0.0, -math.inf], 4, [0])

    def off_support(logp, alpha_t):  # all of q on token 3, where p = 0
        out = torch.full_like(logp, -math.inf)
        out[:, 3] = 0.0
        return out

    sched = Scheduler(lm)
    bad = sched.submit(PROMPT, seed=0, particles=3, proposal=off_support, max_new_tokens=3)
    good = sched.submit(PROMPT, seed=1, particles=3, max_new_tokens=3)
    sched.run()
    assert good.error is None and good.result().num_particles == 3
    with pytest.raises(DegenerateWeightsError):
        bad.result()
