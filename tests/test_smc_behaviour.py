"""Seeding, result fields, EOS handling and bad input for smc_sample on toy models."""

import math

import pytest
import torch
from toy_models import HORIZON, PROMPT, random_lm, row_limited, trap_lm

from powersmc import FunctionLM, InputError, smc_sample
from powersmc.methods.smc import smc_program
from powersmc.runtime.api import run_programs


def test_seed_is_bit_reproducible_and_global_rng_untouched():
    lm = random_lm()
    state = torch.get_rng_state()
    a = smc_sample(lm, PROMPT, particles=16, max_new_tokens=HORIZON, seed=123)
    b = smc_sample(lm, PROMPT, particles=16, max_new_tokens=HORIZON, seed=123)
    assert torch.equal(state, torch.get_rng_state())
    assert a.to_dict() | {"cost": None} == b.to_dict() | {"cost": None}
    runs = {tuple(smc_sample(lm, PROMPT, particles=16, max_new_tokens=HORIZON, seed=s).token_ids)
            for s in range(30)}
    assert len(runs) > 1


def test_unseeded_runs_record_their_seed():
    lm = random_lm()
    r = smc_sample(lm, PROMPT, particles=8, max_new_tokens=HORIZON)
    again = smc_sample(lm, PROMPT, particles=8, max_new_tokens=HORIZON, seed=r.seed)
    assert r.token_ids == again.token_ids and r.log_z == again.log_z


def test_result_fields_and_finished_particles_leave_batch():
    lm = trap_lm()
    r = smc_sample(lm, PROMPT, particles=32, max_new_tokens=HORIZON, seed=0)
    assert len(r.particles) == 32 and len(r.ess) == len(r.log_z_t) <= HORIZON
    assert all(s <= HORIZON for s in r.resample_steps)
    assert math.isfinite(r.log_z) and r.log_z < 0
    for p in r.particles:
        assert p.finished == (p.token_ids[-1] == 0) and len(p.token_ids) <= HORIZON
    # the prefill serves the first token; each decode step only runs the live particles
    assert r.cost.forward_passes <= HORIZON
    assert r.cost.token_evals < 32 * (HORIZON - 1)


def test_stops_when_all_particles_finish():
    lm = FunctionLM(lambda prefix: [0.0, -math.inf], vocab_size=2, eos_token_ids=[0])
    r = smc_sample(lm, [1], particles=4, max_new_tokens=50, seed=0)
    assert r.token_ids == [0] and r.cost.forward_passes == 1 and len(r.ess) == 1


def test_several_eos_ids():
    lm = FunctionLM(lambda p: [0.0, 0.0, 0.0], vocab_size=3, eos_token_ids=[0, 2])
    r = smc_sample(lm, [1], particles=64, max_new_tokens=10, seed=0)
    assert all(p.finished == (p.token_ids[-1] in (0, 2)) for p in r.particles)
    assert all(1 not in p.token_ids[-1:] or len(p.token_ids) == 10 for p in r.particles)


def test_fixed_temperature_and_custom_proposal_stay_exact_in_expectation():
    """Any prefix-only proposal gives the same expected evidence (eq. 8 is exact for any q)."""
    from powersmc.exact import power_distribution

    lm = trap_lm()
    _, log_z_true = power_distribution(lm, PROMPT, HORIZON, 4.0)
    uniform = lambda logp, a: torch.full_like(logp, -math.log(logp.shape[-1]))  # noqa: E731
    for kw in ({"tau": 0.5}, {"proposal": uniform}):
        runs = run_programs(lm, [smc_program(lm, PROMPT, particles=8, max_new_tokens=HORIZON,
                                             seed=s, **kw) for s in range(1500)])
        z = [math.exp(r.log_z - log_z_true) for r in runs]  # each as smc_sample(seed=s) alone
        m = sum(z) / len(z)
        sd = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))
        assert abs(m - 1) < 4.0 * sd / math.sqrt(len(z))


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"alpha": 0.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"particles": 0}, "particles"),
        ({"ess_threshold": -0.1}, "ess_threshold"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"resampler": "nope"}, "resampler"),
        ({"seed": -1}, "seed"),
        ({"ramp_tokens": -2}, "ramp_tokens"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"order": "backwards"}, "order"),
        ({"order": "adapted", "tau": 0.5}, "order"),
        ({"order": "adapted", "proposal": lambda lp, a: lp}, "order"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, arg):
    with pytest.raises(InputError, match=f"^{arg}:"):
        smc_sample(random_lm(), PROMPT, **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts():
    lm = FunctionLM(lambda p: [0.0, 0.0], vocab_size=2, eos_token_ids=[0], max_context=8)
    with pytest.raises(InputError, match="^prompt:"):
        smc_sample(lm, [], max_new_tokens=2)
    with pytest.raises(InputError, match="^prompt:"):
        smc_sample(lm, [1] * 8, max_new_tokens=2)
    with pytest.raises(InputError, match="^max_new_tokens:"):
        smc_sample(lm, [1] * 4, max_new_tokens=5)
    with pytest.raises(InputError, match="^prompt:"):
        smc_sample(lm, [5], max_new_tokens=2)


def test_unknown_model_path():
    from powersmc import load_model

    with pytest.raises(InputError, match="^model:"):
        load_model("./no/such/model.gguf")
    with pytest.raises(InputError, match="^model:"):
        load_model("/definitely/not/here")


def test_log_z_t_is_the_power_normalizer():
    """log_z_t (eq. 13) under the optimal proposal equals log sum_v p(v)^alpha_t, computed from
    the incremental weights; with another proposal it is summed over the vocabulary. Step 1:
    every particle conditions on the prompt alone."""
    from powersmc.weights import log_power_normalizer

    lm = random_lm()
    exact = float(log_power_normalizer(lm._logprobs(tuple(PROMPT)), 4.0))
    for tau in (None, 0.5):
        r = smc_sample(lm, PROMPT, alpha=4.0, particles=8, max_new_tokens=HORIZON, seed=0,
                       tau=tau)
        assert abs(r.log_z_t[0] - exact) < 1e-5


def test_row_limited_backend_admits_systems_as_rows_free():
    """A backend holding at most `max_rows` rows (llama.cpp: 255) never holds more: the
    P * rounds particle systems join the running batch as rows free up; more particles than
    rows is a clear error."""
    lm = random_lm()
    sizes = row_limited(lm, 8)
    r = smc_sample(lm, PROMPT, particles=4, rounds=5, max_new_tokens=4, seed=0)
    assert max(sizes) == 8 and len(r.particles) == 20 and r.stats["rounds"] == 5
    with pytest.raises(InputError, match="^particles: at most 8"):
        smc_sample(lm, PROMPT, particles=9, max_new_tokens=4, seed=0)
