"""Answer selection: the weighted vote, select= / rounds= contracts, and their bad input."""

import math

import pytest
from toy_models import HORIZON, PROMPT, random_lm, trap_lm

from powersmc import InputError, Particle, smc_sample
from powersmc.methods.selection import normalized, weighted_vote


def _p(text, lw):
    return Particle([], text, lw, True)


def test_vote_sums_normalised_weights_per_answer():
    # 'b' has the heaviest single particle, but 'a' carries more weight in total
    parts = [_p("a", math.log(0.2)), _p("b", math.log(0.35)), _p("a", math.log(0.25)),
             _p("c", math.log(0.2))]
    assert weighted_vote(parts) == 2  # the heaviest particle of the winning answer
    assert abs(sum(normalized(parts)) - 1) < 1e-12
    # answers compared by key: 'A' and 'a' are one answer; None (no answer) does not vote
    parts = [_p("a", 0.0), _p("A", 0.0), _p("b", 0.5), _p("?", 5.0)]
    assert weighted_vote(parts, key=lambda t: None if t == "?" else t.lower()) in (0, 1)
    assert weighted_vote(parts, key=lambda t: None) is None


def test_vote_ties_broken_by_weight_then_index():
    parts = [_p("a", math.log(0.25)), _p("a", math.log(0.25)), _p("b", math.log(0.4)),
             _p("b", math.log(0.1))]
    assert weighted_vote(parts) == 2  # 'a' and 'b' tie at 0.5; b holds the heavier particle
    parts[3] = _p("b", math.log(0.09))
    assert weighted_vote(parts) == 0  # no tie: 'a' wins
    parts = [_p("a", 0.0), _p("b", 0.0)]
    assert weighted_vote(parts) == 0


def test_select_vote_returns_the_weighted_mode_and_keeps_the_draw():
    lm = trap_lm()
    r = smc_sample(lm, PROMPT, particles=16, max_new_tokens=HORIZON, seed=3, select="vote",
                   key=lambda t: t)
    drawn = smc_sample(lm, PROMPT, particles=16, max_new_tokens=HORIZON, seed=3)
    assert r.stats["chosen_particle"] == drawn.stats["chosen_particle"]
    assert [p.token_ids for p in r.particles] == [p.token_ids for p in drawn.particles]
    v = r.stats["voted_particle"]
    assert r.token_ids == r.particles[v].token_ids
    w = normalized(r.particles)
    mass = {}
    for p, wi in zip(r.particles, w, strict=True):
        mass[p.text] = mass.get(p.text, 0.0) + wi
    assert mass[r.text] == max(mass.values())


def test_rounds_combine_particles_and_evidence():
    lm = random_lm()
    r = smc_sample(lm, PROMPT, particles=4, rounds=5, max_new_tokens=HORIZON, seed=0)
    assert len(r.particles) == 20 and r.stats["rounds"] == 5
    zs = r.stats["round_log_z"]
    assert abs(r.log_z - (math.log(sum(math.exp(z) for z in zs)) - math.log(5))) < 1e-12
    # the combined weights of round k's particles sum to Z_hat_k / sum Z_hat
    w = normalized(r.particles)
    for k, z in enumerate(zs):
        share = sum(w[4 * k : 4 * k + 4])
        assert abs(share - math.exp(z) / sum(math.exp(x) for x in zs)) < 1e-9
    assert r.token_ids == r.particles[r.stats["chosen_particle"]].token_ids
    one = smc_sample(lm, PROMPT, particles=4, max_new_tokens=HORIZON, seed=0)
    assert r.cost.token_evals > one.cost.token_evals


@pytest.mark.parametrize("kw,arg", [({"select": "best"}, "select"), ({"rounds": 0}, "rounds"),
                                    ({"rounds": 1.5}, "rounds")])
def test_bad_input(kw, arg):
    with pytest.raises(InputError, match=f"^{arg}:"):
        smc_sample(random_lm(), PROMPT, max_new_tokens=HORIZON, **kw)
