"""Every method as a program of the one `Scheduler` (`methods.program`).

A seeded program gives bit-identical results alone and among other programs on a
batch-invariant model (`FunctionLM`); programs of every method in one batch are each exact for
their own target; K MH chains in flight share the scheduler's forward passes; a program's
cost counts every token it evaluated, rejected proposals and rollouts included.
"""

import math

import pytest
from stats import num_cells, weighted_frequency_z, z_threshold
from toy_models import HORIZON, PROMPT, random_lm, trap_lm

from powersmc import InputError, Scheduler
from powersmc.exact import power_distribution, tempered_distribution
from powersmc.methods.program import Continue
from powersmc.methods.registry import METHODS, method_program
from powersmc.runtime.api import run_program, run_programs

OPTS = {"particles": 4, "num_blocks": 2, "mh_moves": 3, "candidates": 3, "rollouts": 2,
        "stage_tokens": 3, "ess_threshold": 0.9,
        "horizon": 2, "num_samples": 3}


def _program(method, lm, seed, T=HORIZON + 2):
    return method_program(method, lm, PROMPT, alpha=3.0, max_new_tokens=T, seed=seed, **OPTS)


@pytest.mark.parametrize("method", list(METHODS))
def test_seeded_program_is_bit_identical_alone_and_among_others(method):
    """Alone on a fresh scheduler, then started after the batch is running, between programs
    of every other method: same tokens, same statistics, same token evaluations."""
    lm = random_lm()
    for seed in range(3):
        alone = run_program(lm, _program(method, lm, seed))
        sched = Scheduler(lm)
        others = [sched.start(_program(m, lm, 100 + seed)) for m in METHODS]
        sched.step()
        sched.step()
        mine = sched.start(_program(method, lm, seed))
        others += [sched.start(_program(m, lm, 200 + seed)) for m in reversed(list(METHODS))]
        sched.run()
        busy = mine.result()
        assert busy.token_ids == alone.token_ids and busy.samples == alone.samples
        assert busy.stats == alone.stats
        assert busy.cost.token_evals == alone.cost.token_evals
        assert busy.cost.prefill_tokens == alone.cost.prefill_tokens
        assert all(h.done and h.error is None for h in others)


def test_every_method_in_one_batch_is_exact_for_its_target():
    """MH, best-of-N and low-temperature decoding run as programs side by side in one
    scheduler: exact MH hits pi_alpha within Monte Carlo error, best-of-N's evidence-weighted
    draw is exactly pi_alpha, low temperature is exactly the product of tempered conditionals."""
    lm, runs, alpha, T = trap_lm(), 1500, 4.0, 2
    pi, log_z = power_distribution(lm, PROMPT, T, alpha)
    low = tempered_distribution(lm, PROMPT, T, 1 / alpha)
    mh = [method_program("mh", lm, PROMPT, alpha=alpha, max_new_tokens=T, seed=s, num_blocks=1,
                         mh_moves=20) for s in range(runs)]
    bon = [method_program("bon", lm, PROMPT, alpha=alpha, max_new_tokens=T, seed=10_000 + s,
                          particles=2) for s in range(runs)]
    lt = [method_program("lowtemp", lm, PROMPT, alpha=alpha, max_new_tokens=T, seed=20_000 + s)
          for s in range(runs)]
    order = [p for trio in zip(mh, bon, lt, strict=True) for p in trio]  # interleaved
    out = run_programs(lm, order)
    mh_out, bon_out, lt_out = out[0::3], out[1::3], out[2::3]
    tests = num_cells(pi, runs) * 2 + num_cells(low, runs)
    _, worst = weighted_frequency_z([tuple(r.token_ids) for r in mh_out], [1.0] * runs, pi)
    assert worst < z_threshold(tests), f"mh: max |z| {worst:.2f}"
    z_hat = [math.exp(r.log_z - log_z) for r in bon_out]
    _, worst = weighted_frequency_z([tuple(r.token_ids) for r in bon_out], z_hat, pi)
    assert worst < z_threshold(tests), f"bon: max |z| {worst:.2f}"
    _, worst = weighted_frequency_z([tuple(r.token_ids) for r in lt_out], [1.0] * runs, low)
    assert worst < z_threshold(tests), f"lowtemp: max |z| {worst:.2f}"


def test_mh_chains_in_flight_share_forward_passes():
    """8 MH chains started together take at most 1.3x the forward passes of one chain alone
    (each step feeds every chain's proposal rows in one pass), while their token
    evaluations add up."""
    lm = random_lm()
    kw = dict(alpha=4.0, max_new_tokens=24, num_blocks=4, mh_moves=5)
    solo = [run_program(lm, method_program("mh", lm, PROMPT, seed=s, **kw)) for s in range(8)]
    sched = Scheduler(lm)
    hs = [sched.start(method_program("mh", lm, PROMPT, seed=s, **kw)) for s in range(8)]
    sched.run()
    together = [h.result() for h in hs]
    one = max(r.cost.forward_passes for r in solo)
    print(f"8 MH chains: {sched.steps} scheduler steps; one chain alone: {one} passes "
          f"(ratio {sched.steps / one:.2f})")
    assert sched.steps <= 1.3 * one
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert sum(r.cost.token_evals for r in together) == sum(r.cost.token_evals for r in solo)


def test_cost_counts_every_proposal():
    """MH's token evaluations are the rows fed after each proposal's first token, summed over
    every proposal, accepted or not; its prefill counts each proposal's prompt + kept prefix."""
    lm = trap_lm()
    seen = []

    def counting():  # the MH program, its requests recorded on the way
        prog = method_program("mh", lm, PROMPT, alpha=4.0, max_new_tokens=4, seed=3,
                              num_blocks=2, mh_moves=4)
        reqs = next(prog)
        try:
            while True:
                seen.append(reqs[0])
                out = yield reqs
                seen[-1] = (seen[-1], out[0])
                reqs = prog.send(out)
        except StopIteration as stop:
            return stop.value

    r = run_program(lm, counting())
    evals = sum(max(len(rows.tokens[0]) - 1, 0) for _, rows in seen)
    prefill = sum(len(req.ids) for req, _ in seen)
    assert r.stats["proposed"] == 8 and r.cost.token_evals == evals
    assert r.cost.prefill_tokens == prefill


def test_a_request_wider_than_the_engine_is_refused_at_start():
    lm = trap_lm()
    sched = Scheduler(lm, max_rows=4)

    def wide():
        yield [Continue(PROMPT, 5, 2, __import__("torch").Generator())]

    with pytest.raises(InputError, match="^rows:"):
        sched.start(wide())
    assert sched.idle
