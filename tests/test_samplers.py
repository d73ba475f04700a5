"""The sampler family after Power-SMC against pi_alpha enumerated on toy LMs (issue 29).

Two kinds of proof. The kernels themselves, enumerated from scratch: every move of the
fixed-horizon kernel (PPT's rungs, smc-rm's rejuvenation) and of exact entropy-cut MH leaves
pi_alpha invariant to float precision, and the published entropy-cut scoring does not. Then the
programs, by Monte Carlo with the Bonferroni z-tests of `stats`: exact entropy-cut MH's output
is distributed as the enumerated kernel's law after M moves, every PPT rung hits its own
pi_{a_k}, and smc-rm's evidence-weighted output is pi_alpha with an unbiased evidence.
`trap_lm` and `random_lm` have next-token entropies that vary by path and EOS at every length.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from stats import mean_z, num_cells, weighted_frequency_z, z_threshold
from toy_models import PROMPT, random_lm, trap_lm

from powersmc.exact import power_distribution, tempered_distribution, total_variation
from powersmc.methods.mcmc import cut_law, mh_log_ratio
from powersmc.methods.mh import mh_program
from powersmc.methods.ppt import default_ladder, ppt_program
from powersmc.methods.registry import method_program
from powersmc.methods.resample_move import smc_rm_program
from powersmc.runtime.api import run_programs
from powersmc.weights import shannon_entropy

ALPHA = 4.0
MODELS = {"trap": trap_lm, "random": random_lm}


# --- the kernels, enumerated ------------------------------------------------------------------

def _per_position(lm, y, alpha):
    """log p, log q (temperature 1/alpha), zeta and entropy at each position of y."""
    lp, lq, zeta, ent = [], [], [], []
    for t in range(len(y)):
        logp = lm._logprobs(tuple(PROMPT) + tuple(y[:t])).double()
        q = torch.log_softmax(alpha * logp, -1)
        lp.append(float(logp[y[t]]))
        lq.append(float(q[y[t]]))
        zeta.append(float(torch.logsumexp(alpha * logp, -1)))
        ent.append(float(shannon_entropy(logp)))
    return lp, lq, zeta, ent


def _suffixes(lm, prefix, n, alpha):
    """Every continuation of `prefix` by at most n tokens drawn from q (stopping at EOS), with
    its probability under q."""
    out = {}
    stack = [((), 0.0)]
    while stack:
        z, lw = stack.pop()
        logq = torch.log_softmax(alpha * lm._logprobs(tuple(PROMPT) + prefix + z).double(), -1)
        for v in range(lm.vocab_size):
            if logq[v] == -math.inf:
                continue
            nz, nlw = z + (v,), lw + float(logq[v])
            if v in lm.eos_token_ids or len(nz) == n:
                out[nz] = math.exp(nlw)
            else:
                stack.append((nz, nlw))
    return out


def _kernel(lm, T, alpha, move):
    """The transition matrix {x: {y: prob}} over pi_alpha's support of horizon T for the
    proposals and acceptances of `move(x, info)` -> [(prob of proposal, y, log R)]."""
    pi, _ = power_distribution(lm, PROMPT, T, alpha)
    info = _Info(lambda y: _per_position(lm, y, alpha))
    K = {}
    for x in pi:
        row: dict = {}
        for prob, y, log_r in move(x, info):
            row[y] = row.get(y, 0.0) + prob * min(1.0, math.exp(min(log_r, 50.0)))
        row[x] = row.get(x, 0.0) + 1.0 - sum(row.values())
        K[x] = row
    return pi, K


class _Info(dict):
    """Per-position quantities of any sequence, computed on first use (a biased kernel may
    propose sequences outside pi's support)."""

    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def __missing__(self, y):
        self[y] = value = self.compute(y)
        return value


def _step(dist, K):
    out: dict = {}
    for x, p in dist.items():
        for y, k in K[x].items():
            out[y] = out.get(y, 0.0) + p * k
    return out


def _fixed_horizon_moves(lm, T, alpha):
    """PPT's and smc-rm's move at horizon T: cut r uniform on 0..T-1, a self-transition in
    the padding, else regenerate through T, accepted with the zeta ratio (`mh_log_ratio`)."""
    def move(x, info):
        for r in range(len(x)):
            for z, qz in _suffixes(lm, x[:r], T - r, alpha).items():
                y = x[:r] + z
                yield qz / T, y, mh_log_ratio(info[y][2][r:], info[x][2][r:])
    return move


def _ecmh_moves(lm, T, alpha, beta, faithful):
    """Entropy-cut MH at the length cap T: exact (regenerate up to T, full sums, cut-law
    correction) or the published scoring (regenerate up to the current length, the current
    suffix truncated to the proposal's length)."""
    def move(x, info):
        L = len(x)
        cut_x = cut_law(info[x][3], L, beta)
        for j in range(L):
            if cut_x[j] == 0:
                continue
            for z, qz in _suffixes(lm, x[:j], (L if faithful else T) - j, alpha).items():
                y = x[:j] + z
                (lpx, lqx, _, _), (lpy, lqy, _, enty) = info[x], info[y]
                cur = slice(j, len(y)) if faithful else slice(j, None)
                log_r = (alpha * (sum(lpy[j:]) - sum(lpx[cur])) + sum(lqx[cur]) - sum(lqy[j:]))
                cut_y = cut_law(enty, len(y), beta)[j]
                log_r += (math.log(cut_y) if cut_y > 0 else -math.inf) - math.log(cut_x[j])
                yield cut_x[j] * qz, y, log_r
    return move


@pytest.mark.parametrize("model", MODELS)
def test_fixed_horizon_move_leaves_pi_invariant(model):
    """PPT's local move (every rung) and smc-rm's rejuvenation, at several exponents."""
    lm = MODELS[model]()
    for alpha in (1.0, 2.5, ALPHA):
        pi, K = _kernel(lm, 3, alpha, _fixed_horizon_moves(lm, 3, alpha))
        after = _step(pi, K)
        assert max(abs(after[y] - pi[y]) for y in pi) < 1e-12
        assert min(K[x][x] for x in pi) < 1  # it moves


@pytest.mark.parametrize("model", MODELS)
def test_entropy_cut_mh_is_exact_and_the_published_scoring_is_not(model):
    lm = MODELS[model]()
    pi, K = _kernel(lm, 3, ALPHA, _ecmh_moves(lm, 3, ALPHA, 4.0, faithful=False))
    assert max(abs(v - pi[y]) for y, v in _step(pi, K).items()) < 1e-12
    _, Kf = _kernel(lm, 3, ALPHA, _ecmh_moves(lm, 3, ALPHA, 4.0, faithful=True))
    drift = total_variation(_step(pi, Kf), pi)
    print(f"{model}: TV(pi K_published, pi) = {drift:.4f}")
    assert drift > 1e-6  # float error is below 1e-12 (the exact kernel above)


# --- the programs, by Monte Carlo ------------------------------------------------------------

def _emp(draws):
    return {k: v / len(draws) for k, v in Counter(draws).items()}


def test_ecmh_program_follows_its_kernel():
    """One block (the first draw from q at temperature 1/alpha, then M entropy-cut moves):
    the program's answers are distributed as the enumerated law q K^M, which approaches pi."""
    lm, T, M, R = trap_lm(), 3, 6, 2000
    pi, K = _kernel(lm, T, ALPHA, _ecmh_moves(lm, T, ALPHA, 4.0, faithful=False))
    law = tempered_distribution(lm, PROMPT, T, 1 / ALPHA)
    start = total_variation(law, pi)
    for _ in range(M):
        law = _step(law, K)
    assert total_variation(law, pi) < start / 2
    out = run_programs(lm, [mh_program(lm, PROMPT, alpha=ALPHA, max_new_tokens=T, num_blocks=1,
                                       mh_moves=M, cut_power=4.0, seed=s) for s in range(R)])
    draws = [tuple(r.token_ids) for r in out]
    _, worst = weighted_frequency_z(draws, [1.0] * R, law)
    assert worst < z_threshold(num_cells(law, R))
    assert out[0].method == "ecmh-exact" and out[0].stats["cut_power"] == 4.0


def test_ppt_every_rung_hits_its_target():
    lm, T, R, ladder = trap_lm(), 3, 800, (1.5, 2.5, ALPHA)
    out = run_programs(lm, [ppt_program(lm, PROMPT, max_new_tokens=T, alphas=ladder,
                                        stage_tokens=2, mh_moves=20, seed=s)
                            for s in range(R)])
    for k, a in enumerate(ladder):
        pi, _ = power_distribution(lm, PROMPT, T, a)
        draws = [tuple(r.samples[k]) for r in out]
        _, worst = weighted_frequency_z(draws, [1.0] * R, pi)
        print(f"rung {a}: TV {total_variation(_emp(draws), pi):.3f}, max |z| {worst:.2f}")
        assert worst < z_threshold(num_cells(pi, R) * len(ladder))
    assert [tuple(r.token_ids) for r in out] == [tuple(r.samples[-1]) for r in out]
    stats = out[0].stats
    assert stats["alphas"] == list(ladder) and len(stats["swap_acceptance"]) == 2
    assert len(stats["move_acceptance"]) == 3


@pytest.mark.parametrize("model", MODELS)
def test_smc_rm_evidence_weighted_output_is_exact(model):
    lm, T, R = MODELS[model](), 4, 2000
    pi, log_z = power_distribution(lm, PROMPT, T, ALPHA)
    out = run_programs(lm, [smc_rm_program(lm, PROMPT, alpha=ALPHA, particles=8,
                                           max_new_tokens=T, rejuvenate_moves=2,
                                           ess_threshold=0.9, seed=s) for s in range(R)])
    draws = [tuple(r.token_ids) for r in out]
    z_hat = [math.exp(r.log_z - log_z) for r in out]
    _, worst = weighted_frequency_z(draws, z_hat, pi)
    assert worst < z_threshold(num_cells(pi, R) * len(MODELS))
    assert mean_z(z_hat, 1.0) < z_threshold(len(MODELS))
    assert sum(r.stats["moves_proposed"] for r in out) > R / 10  # it did move


def test_ppt_replicas_share_forward_passes():
    """K = 4 replicas take about the forward passes of one chain with the same stages and
    moves: a round's cut is shared, so their regenerations step together."""
    lm = random_lm()
    def passes(ladder):
        out = run_programs(lm, [ppt_program(lm, PROMPT, max_new_tokens=12, alphas=ladder,
                                            stage_tokens=4, mh_moves=4, seed=s)
                                for s in range(30)])
        return sum(r.cost.forward_passes for r in out)
    four, one = passes(default_ladder(ALPHA)), passes([ALPHA])
    print(f"forward passes: K = 4 {four}, K = 1 {one}: {four / one:.2f}x")
    assert four <= 1.2 * one


def test_default_ladder():
    assert default_ladder(4.0) == pytest.approx((2.5, 2.5 * 1.6 ** (1 / 3),
                                                 2.5 * 1.6 ** (2 / 3), 4.0))
    assert default_ladder(1.0) == (1.0,)


# --- the selectors, by hand -------------------------------------------------------------------

def _parts(rows):
    """Particles from (token ids, text, log-weight)."""
    from powersmc.results import Particle
    return [Particle(list(t), text, lw, True) for t, text, lw in rows]


def test_majority_by_hand():
    from powersmc.methods.selection import majority
    # pools: "7" x3 (scores -1, -2, -3), "8" x2, no answer x2
    texts = ["7", "8", "7", None, "8", "7", None]
    key = lambda t: t  # noqa: E731
    scores = [-1.0, -0.1, -2.0, 0.0, -0.2, -3.0, 0.0]
    assert majority([t or "" for t in texts], scores, lambda t: t or None) == 0
    # a tie of 2 against 2: the pool with the higher summed score (-0.3 against -3.0) wins,
    # and its best member is returned
    texts = ["7", "8", "7", "8"]
    assert majority(texts, [-1.0, -0.2, -2.0, -0.1], key) == 3
    assert majority(["x", "y"], [0.0, 0.0], lambda t: None) is None


def test_consensus_by_hand():
    """Identical trajectories vote once; the cluster with the most distinct trajectories wins,
    ties broken by pooled weight."""
    from powersmc.methods.selection import consensus
    w = math.log
    parts = _parts([
        ((1, 2), "A=5", w(0.30)), ((1, 2), "A=5", w(0.30)),  # one trajectory, weight 0.6
        ((3,), "B=6", w(0.05)), ((4,), "B=6", w(0.05)),      # two trajectories, answer 6
        ((5,), "none", w(0.30))])                            # no answer: no vote
    key = lambda t: t.split("=")[1] if "=" in t else None  # noqa: E731
    assert key(parts[consensus(parts, key)].text) == "6"  # 2 distinct beat 1 heavy
    # the weighted vote on the same particles picks the heavy answer
    from powersmc.methods.selection import weighted_vote
    assert key(parts[weighted_vote(parts, key)].text) == "5"
    # a tie in distinct trajectories: the pooled weight decides
    tie = _parts([((1,), "A=5", w(0.6)), ((2,), "B=6", w(0.4))])
    assert consensus(tie, key) == 0
    assert consensus(_parts([((1,), "none", 0.0)]), key) is None


def test_maj_program_returns_the_largest_pool():
    lm = trap_lm()
    out = run_programs(lm, [method_program("maj", lm, PROMPT, alpha=ALPHA, max_new_tokens=3,
                                           seed=s, particles=9) for s in range(20)])
    for r in out:
        assert len(r.samples) == 9 and r.method == "maj"
        counts = Counter(tuple(s) for s in r.samples)
        assert counts[tuple(r.token_ids)] == max(counts.values())
        assert r.stats["votes"][0] == max(counts.values())


# --- bad settings -----------------------------------------------------------------------------

@pytest.mark.parametrize("options,name", [
    ({"alphas": [2.0, 1.5, 3.0]}, "alphas"), ({"alphas": [0.5, 2.0]}, "alphas"),
    ({"alphas": []}, "alphas"), ({"alphas": "2,3"}, "alphas"),
    ({"stage_tokens": 0}, "stage_tokens"), ({"mh_moves": -1}, "mh_moves")])
def test_ppt_bad_settings(options, name):
    from powersmc import InputError
    with pytest.raises(InputError) as e:
        next(ppt_program(trap_lm(), PROMPT, max_new_tokens=3, **options))
    assert e.value.argument == name


@pytest.mark.parametrize("method,options,name", [
    ("ecmh", {"cut_power": -1.0}, "cut_power"), ("smc-rm", {"rejuvenate_moves": -1},
                                                  "rejuvenate_moves"),
    ("maj", {"maj_samples": 0}, "maj_samples")])
def test_family_bad_settings(method, options, name):
    from powersmc import InputError
    from powersmc.methods.registry import method_program as mp
    with pytest.raises(InputError) as e:
        next(mp(method, trap_lm(), PROMPT, alpha=ALPHA, max_new_tokens=3, seed=0, **options))
    assert e.value.argument == name


def test_smc_rm_refuses_a_ramp():
    from powersmc import InputError
    with pytest.raises(InputError) as e:
        next(smc_rm_program(trap_lm(), PROMPT, max_new_tokens=3, ramp_tokens=4))
    assert e.value.argument == "ramp_tokens"


def test_select_needs_several_answers():
    from powersmc import InputError
    from powersmc.methods.registry import check_select_for
    check_select_for(["smc", "mh"], "consensus")  # one of them has several answers
    for select in ("consensus", "majority", "vote"):
        with pytest.raises(InputError) as e:
            check_select_for(["mh", "ppt"], select)
        assert e.value.argument == "select"


def test_trace_draws_each_family(tmp_path):
    """`--trace`: ESS and resampling (SMC family), acceptance per block (MH family), swap and
    move acceptance (PPT); a method with nothing to draw is refused, naming --trace."""
    from powersmc import InputError
    from powersmc.trace import check_trace, plot_trace
    lm = trap_lm()
    for method, opts in (("smc-rm", {"particles": 4, "ess_threshold": 0.9}),
                         ("ecmh", {"num_blocks": 2, "mh_moves": 3}),
                         ("ppt", {"stage_tokens": 2, "mh_moves": 2})):
        check_trace(method)
        (r,) = run_programs(lm, [method_program(method, lm, PROMPT, alpha=ALPHA,
                                                max_new_tokens=4, seed=0, **opts)])
        path = tmp_path / f"{method}.png"
        plot_trace(r, path)
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert len(r.stats["swap_acceptance"]) == 3  # the default ladder's 3 pairs
    with pytest.raises(InputError) as e:
        check_trace("maj")
    assert e.value.argument == "--trace"
