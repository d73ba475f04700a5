"""The server's requests as scheduler programs (`server.systems`), checked against exact
answers on enumerable toy models: decoding rows are independent draws of their decoder
(plain with temperature / top-k / top-p, low temperature), greedy rows are the argmax path,
and best-of-N carries the weights (alpha - 1) log p(y) and an evidence-weighted output that
is exactly pi_alpha. Tolerances are Bonferroni z-thresholds (`stats`)."""

import math

import pytest
import torch
from stats import num_cells, weighted_frequency_z, z_threshold
from toy_models import HORIZON, PROMPT, random_lm, trap_lm

from powersmc import Scheduler, sample
from powersmc.exact import decoder_distribution, power_distribution
from powersmc.proposals import NucleusProposal
from powersmc.server.jobs import Job
from powersmc.server.systems import programs

ALPHA = 4.0


def _job(method: str, n: int, seed: int, **options) -> Job:
    return Job(chat=False, prompts=[PROMPT], n=n, method=method, alpha=ALPHA,
               max_tokens=HORIZON, seed=seed, options=options)


def _run(lm, jobs: list[Job]) -> list:
    """Every job's programs through one scheduler; the results in submission order."""
    sched = Scheduler(lm)
    handles = [sched.start(p) for job in jobs for p in programs(job, lm, [PROMPT])]
    sched.run()
    return [h.result() for h in handles]


@pytest.mark.parametrize("options,logq", [
    ({"temperature": 0.7, "top_k": 3, "top_p": 0.8},  # the nucleus proposal
     lambda lp: NucleusProposal(0.7, 3, 0.8)(lp, 1.0)),
    ({"temperature": 1.3, "top_k": None, "top_p": None},  # a fixed tau
     lambda lp: torch.log_softmax(lp / 1.3, -1)),
    ({"temperature": 1.0, "top_k": None, "top_p": 1.0},  # the model itself
     lambda lp: lp),
    ("lowtemp", lambda lp: torch.log_softmax(lp * ALPHA, -1)),
])
def test_decoding_rows_are_independent_draws_of_the_decoder(options, logq):
    lm = random_lm()
    method, opts = ("lowtemp", {}) if options == "lowtemp" else ("plain", options)
    results = _run(lm, [_job(method, 40, seed, **opts) for seed in range(100)])
    draws = [tuple(s) for r in results for s in r.samples]
    assert len(draws) == 4000
    target = decoder_distribution(lm, PROMPT, HORIZON, logq)
    _, worst = weighted_frequency_z(draws, [1.0] * len(draws), target)
    assert worst < z_threshold(num_cells(target, len(draws)))


@pytest.mark.parametrize("make", [trap_lm, random_lm])
def test_greedy_rows_are_the_argmax_path(make):
    lm = make()
    (res,) = _run(lm, [_job("greedy", 3, 0)])
    want = sample(lm, PROMPT, greedy=True, num_samples=1, max_new_tokens=HORIZON, seed=0)
    assert res.samples == want.samples * 3
    (res,) = _run(lm, [_job("plain", 2, 0, temperature=0, top_k=None, top_p=None)])
    assert res.samples == want.samples * 2


def test_best_of_n_weights_and_its_evidence_weighted_output_are_exact():
    """Every particle's weight is (alpha - 1) log p(y) of its whole sequence; drawing the
    answer by weight and weighting it by the system's evidence gives pi_alpha for any N."""
    lm = random_lm()
    runs = 3000
    results = _run(lm, [_job("bon", 1, seed, particles=4) for seed in range(runs)])
    for r in results[:50]:
        for p in r.particles:
            seq = tuple(PROMPT) + tuple(p.token_ids)
            log_p = sum(float(lm._logprobs(seq[:i])[seq[i]]) for i in range(len(PROMPT),
                                                                             len(seq)))
            # the model's log-probs are float32: log q = log p - log sum_v p(v), whose log-sum
            # is 0 up to float32 rounding (~6e-8 per token, HORIZON tokens)
            assert p.log_weight == pytest.approx((ALPHA - 1) * log_p, abs=HORIZON * 2.4e-7)
    pi, _ = power_distribution(lm, PROMPT, HORIZON, ALPHA)
    draws = [tuple(r.token_ids) for r in results]
    _, worst = weighted_frequency_z(draws, [math.exp(r.log_z) for r in results], pi)
    assert worst < z_threshold(num_cells(pi, runs))
