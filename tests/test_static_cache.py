"""The static KV cache of the Transformers backend (`cache="static"`) against the dynamic one
and against from-scratch evaluation, on tiny random Llama and Qwen2 models (`from_config`,
grouped-query attention) and on the default model.

Tolerances. The tiny models run in float64, so both caches compute the same attention to about
1e-15 and the log-probs, which the backend returns in float32, agree to float32 rounding:
TOL64 = 4 float32 ulps of the largest |log p| compared (|log p| < 16 here, ulp 2^-20).
Against an uncached from-scratch forward (a different summation order, still float64) the
same bound holds. The default model runs in float32: ATOL = 2e-4, the bound of
tests/test_model_backend.py for float32 cached against uncached attention (about 2^-23 * the
~10^3 roundings a 30-layer forward accumulates into a logit).
"""

import math

import pytest
import torch
from hf_toys import as_function_lm, from_scratch, tiny_lm
from stats import mean_z, num_cells, weighted_frequency_z, z_threshold

from powersmc import Scheduler, smc_sample, smc_sample_many
from powersmc.backends.transformers_static import StaticState
from powersmc.errors import InputError
from powersmc.exact import power_distribution

KINDS = ("llama", "qwen2")
TOL64 = 4 * 2.0**-20  # 4 float32 ulps at |log p| in [8, 16)
ATOL = 2e-4
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12]]  # different lengths: left padding in one cache


def _teacher_forced(lm, prompts, rows, steps, index, budget):
    """Prefill, `steps` forced tokens, a reorder by `index`, one more step; every logp and
    the rows' sequences."""
    state, logp = lm.prefill_many(prompts, rows, budget=budget)
    seqs = [list(p) for p in prompts for _ in range(rows)]
    out = [logp]
    for s in range(steps):
        tok = torch.arange(len(seqs)) * 3 + s + 1
        for q, t in zip(seqs, tok.tolist(), strict=True):
            q.append(t)
        out.append(lm.step(state, tok))
    lm.reorder(state, torch.tensor(index))
    seqs = [list(seqs[i]) + [40 + k] for k, i in enumerate(index)]
    out.append(lm.step(state, torch.arange(len(index)) + 40))
    return state, out, seqs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded"])
def test_static_equals_dynamic_teacher_forced(kind, prompts):
    """Same forced tokens, same reorder (repeats and drops): the static cache's log-probs equal
    the dynamic cache's at every step."""
    index = [3, 3, 0, 1] if len(prompts) == 2 else [1, 1, 0]
    runs = {}
    for cache in ("dynamic", "static"):
        lm = tiny_lm(kind, cache)
        state, runs[cache], _ = _teacher_forced(lm, prompts, 2, 4, index, budget=64)
        assert isinstance(state, StaticState) == (cache == "static")
    for a, b in zip(runs["dynamic"], runs["static"], strict=True):
        assert torch.allclose(a, b, atol=TOL64, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("index", [[3, 0, 3, 3, 1, 2], [2, 2], [1, 0, 3, 2], [0]])
def test_reorder_then_step_matches_from_scratch(kind, index):
    """After reorders that repeat, drop, permute and grow past the buffers' rows (6 > 4), every
    row equals an unpadded from-scratch evaluation of its own sequence; then a second reorder
    and step on the changed buffers."""
    lm = tiny_lm(kind, "static")
    state, out, seqs = _teacher_forced(lm, PROMPTS, 2, 3, index, budget=4 * 8)
    assert torch.allclose(out[-1], from_scratch(lm.model, seqs), atol=TOL64, rtol=0)
    back = list(range(len(index)))[::-1]
    lm.reorder(state, torch.tensor(back))
    seqs = [seqs[i] + [50] for i in back]
    logp = lm.step(state, torch.full((len(back),), 50))
    assert torch.allclose(logp, from_scratch(lm.model, seqs), atol=TOL64, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_growing_past_the_budget(kind):
    """A state that outlives its budget gets more slots."""
    lm = tiny_lm(kind, "static")
    state, out, seqs = _teacher_forced(lm, PROMPTS, 1, 5, [0, 1], budget=2)  # 1 slot per row
    assert torch.allclose(out[-1], from_scratch(lm.model, seqs), atol=TOL64, rtol=0)
    cont = [s + [7] for s in seqs]
    assert torch.allclose(lm.step(state, torch.tensor([7, 7])),
                          from_scratch(lm.model, cont), atol=TOL64, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_fixed_shape_step(kind):
    """The fixed-shape step (all buffer rows, all slots, masked), traced by torch.compile
    (backend 'eager': dynamo's graph without code generation, seconds on CPU): equal to the
    dynamic cache with rows that leave (dead rows stay in the buffers) and come back; the
    pooled buffers serve a second run, and a state still holding them moves to its own."""
    dyn = tiny_lm(kind, "dynamic")
    lm = tiny_lm(kind, "static", compile={"backend": "eager"})
    index = [2, 2, 1]  # 4 rows -> 3: one dead row in the compiled buffers
    _, ref, seqs = _teacher_forced(dyn, PROMPTS, 2, 3, index, budget=4 * 8)
    first, out, _ = _teacher_forced(lm, PROMPTS, 2, 3, index, budget=4 * 8)
    assert first.compiled
    for a, b in zip(ref, out, strict=True):
        assert torch.allclose(a, b, atol=TOL64, rtol=0)
    second, out2, _ = _teacher_forced(lm, PROMPTS, 2, 3, index, budget=4 * 8)
    assert second.compiled and not first.compiled  # the pool moved to the newer state
    assert first.cache.keys[0].data_ptr() != second.cache.keys[0].data_ptr()
    for a, b in zip(ref, out2, strict=True):
        assert torch.allclose(a, b, atol=TOL64, rtol=0)
    seqs = [s + [9] for s in seqs]  # the moved state goes on correctly, eagerly
    assert torch.allclose(lm.step(first, torch.full((3,), 9)), from_scratch(lm.model, seqs),
                          atol=TOL64, rtol=0)


def test_compile_failure_falls_back_to_eager():
    """A compiler that fails (as a CUDA graph capture might on an untested stack) costs the
    run nothing: a warning, `compile_error`, and the same log-probs from the eager step."""
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    lm = tiny_lm("llama", "static", compile={"backend": broken})
    with pytest.warns(RuntimeWarning, match="compiled decode step failed"):
        _, out, seqs = _teacher_forced(lm, PROMPTS, 2, 3, [2, 2, 1], budget=4 * 8)
    assert "no compiler here" in lm.compile_error and lm.compile_options is None
    assert torch.allclose(out[-1], from_scratch(lm.model, seqs), atol=TOL64, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_smc_reproduces_and_matches_dynamic(kind):
    """Seeded Power-SMC on the static path reproduces bit for bit, and draws the same tokens
    as on the dynamic path (the float64 models' log-probs agree to float32 rounding)."""
    kw = dict(alpha=4.0, particles=8, max_new_tokens=12, seed=7, ess_threshold=0.9)
    st, dyn = tiny_lm(kind, "static"), tiny_lm(kind, "dynamic")
    a = smc_sample_many(st, PROMPTS, **kw)
    b = smc_sample_many(st, PROMPTS, **kw)
    c = smc_sample_many(dyn, PROMPTS, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] == [r.token_ids for r in c]
    assert [r.log_z for r in a] == [r.log_z for r in b]
    assert all(abs(x.log_z - y.log_z) < 1e-6 for x, y in zip(a, c, strict=True))
    assert sum(len(r.resample_steps) for r in a) > 0


EXACT = [("llama", "standard"), ("qwen2", "adapted")]


@pytest.mark.parametrize("kind,order", EXACT)
def test_smc_on_static_cache_is_exact(kind, order):
    """Power-SMC on the static path against pi_alpha enumerated exactly (vocabulary 4, EOS 0,
    horizon 4): the evidence-weighted output is pi_alpha and exp(log_z) unbiased
    (tests/test_smc_exact.py's check), 2000 systems run as one batch of 2000 x 8 rows, so
    finished particles leave and resampled ones are gathered in the static buffers."""
    lm = tiny_lm(kind, "static", vocab=4, seed=3)
    prompt, horizon, alpha, runs = [2, 3], 4, 4.0, 2000
    pi, log_z_true = power_distribution(as_function_lm(lm), prompt, horizon, alpha)
    out = smc_sample_many(lm, [prompt] * runs, alpha=alpha, particles=8,
                          max_new_tokens=horizon, ess_threshold=1.0, order=order, seed=11)
    assert sum(bool(r.resample_steps) for r in out) > runs / 2
    draws = [tuple(r.token_ids) for r in out]
    z_hat = [math.exp(r.log_z - log_z_true) for r in out]
    _, worst = weighted_frequency_z(draws, z_hat, pi)
    assert worst < z_threshold(num_cells(pi, runs) * len(EXACT))
    assert mean_z(z_hat, 1.0) < z_threshold(len(EXACT))


def test_cache_option_is_checked():
    with pytest.raises(InputError, match="cache"):
        tiny_lm("llama", "paged")
    with pytest.raises(InputError, match="compile"):
        tiny_lm("llama", "dynamic", compile=True)
    assert tiny_lm("qwen2", "auto").cache == "dynamic"  # auto: static on CUDA only,
    assert tiny_lm("qwen2", "auto", continuous=True).cache == "static"  # or for a scheduler


def test_serve_asks_for_the_cache_systems_join():
    """`powersmc serve` loads its model for continuous batching (`continuous=True`: on CPU,
    Transformers' auto cache is then the static one, the only one systems join mid-batch)."""
    from powersmc.cli_parser import build_parser
    from powersmc.server.run import model_kwargs

    def kwargs(*flags):
        return model_kwargs(build_parser().parse_args(["serve", *flags]))

    assert kwargs()["continuous"] is True
    assert kwargs("--kv-cache-gib", "3")["engine"] == {"kv_cache_gib": 3.0}


def test_load_model_passes_compile(tmp_path):
    """`load_model(compile=...)` (`--compile`): 'on' compiles the static decode step even on
    CPU, 'off' never does, anything else is refused by name."""
    from hf_toys import tiny_model, word_tokenizer

    from powersmc import load_model

    tiny_model("llama").save_pretrained(tmp_path)
    word_tokenizer(64).save_pretrained(tmp_path)
    kw = dict(backend="transformers", device="cpu", cache="static")
    assert load_model(tmp_path, compile="on", **kw).compile_options == {"mode": "reduce-overhead"}
    assert load_model(tmp_path, compile="off", **kw).compile_options is None
    with pytest.raises(InputError, match="compile"):
        load_model(tmp_path, compile="yes", **kw)


@pytest.mark.model
def test_default_model_static_equals_dynamic(default_lm):
    """The default model (SmolLM2-135M, float32): teacher-forced log-probs of the static path
    equal the dynamic path's and a from-scratch recompute, with two prompts of different
    lengths, repeats and drops; seeded SMC reproduces on the static path."""
    from powersmc.backends.transformers_lm import TransformersLM

    base = default_lm
    assert base.cache == "dynamic"  # what `auto` picks on CPU (static on CUDA)
    dynamic = base
    static = TransformersLM(base.model, base.tokenizer, cache="static")
    prompts = [base.encode_prompt(t) for t in ("Hi.", "Name three prime numbers.")]
    index = [3, 0, 3]
    runs = {}
    for name, lm in (("dynamic", dynamic), ("static", static)):
        state, runs[name], seqs = _teacher_forced(lm, prompts, 2, 3, index, budget=4 * 8)
        assert isinstance(state, StaticState) == (name == "static")
    for a, b in zip(runs["dynamic"], runs["static"], strict=True):
        assert torch.allclose(a, b, atol=ATOL)
    assert torch.allclose(runs["static"][-1], from_scratch(base.model, seqs), atol=ATOL)
    kw = dict(alpha=4.0, particles=4, max_new_tokens=12, seed=3)
    r1, r2 = (smc_sample(static, "What is 2 + 3?", **kw) for _ in range(2))
    assert r1.token_ids == r2.token_ids and r1.log_z == r2.log_z


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("longer", [False, True], ids=["fits", "shifts"])
def test_admit_appends_rows_to_a_running_state(kind, longer):
    """`admit`: new prompts join a running static state as rows at the end (what a scheduler
    needs to start a new particle system mid-batch). The new rows' log-probs equal a fresh
    prefill of their prompts; after more steps and a reorder that mixes old and new rows,
    every row equals a from-scratch evaluation of its own sequence. `longer`: a new prompt
    longer than the running rows, which moves them right first."""
    lm = tiny_lm(kind, "static")
    state, out, seqs = _teacher_forced(lm, PROMPTS, 1, 3, [1, 0, 0], budget=3 * 8)
    new = [[20 + i for i in range(12 if longer else 3)]]
    logp = lm.extend(state, new, 2, budget=2 * 8)
    assert torch.allclose(logp, from_scratch(lm.model, new * 2), atol=TOL64, rtol=0)
    seqs += [list(new[0]) for _ in range(2)]
    for s in range(2):
        tok = torch.arange(len(seqs)) + 30 + s
        for q, t in zip(seqs, tok.tolist(), strict=True):
            q.append(t)
        logp = lm.step(state, tok)
    assert torch.allclose(logp, from_scratch(lm.model, seqs), atol=TOL64, rtol=0)
    index = [4, 0, 3, 3]
    lm.reorder(state, torch.tensor(index))
    seqs = [seqs[i] + [50] for i in index]
    logp = lm.step(state, torch.full((4,), 50))
    assert torch.allclose(logp, from_scratch(lm.model, seqs), atol=TOL64, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gone", [6, 12], ids=["in-place", "repacked"])
def test_admit_in_place_or_dropping_the_slots_no_running_row_uses(kind, gone):
    """A row with a `gone`-token prompt leaves the batch; its slots are then padding of
    every running row. The next `admit` writes the new row into the buffers in place while
    those slots are fewer than the slots in use (`gone` 6: 4 against 7), and otherwise (12:
    10 against 7) first repacks the state
    without them (every row moves left, positions unchanged), so the state holds the longest
    running row's slots. Either way every row equals a from-scratch evaluation."""
    lm = tiny_lm(kind, "static")
    prompts = [list(range(5, 5 + gone)), [31, 32]]
    state, _, seqs = _teacher_forced(lm, prompts, 1, 3, [0, 1], budget=2 * 8)
    new = [[20, 21, 22]]
    lm.extend(state, new, 2, budget=2 * 8)
    seqs += [list(new[0]) for _ in range(2)]
    tok = torch.arange(4) + 40
    seqs = [q + [t] for q, t in zip(seqs, tok.tolist(), strict=True)]
    lm.step(state, tok)
    lm.reorder(state, torch.tensor([1, 2, 3]))  # the `gone`-token prompt's row leaves
    seqs = seqs[1:]
    length, buffers, longest = state.length, state.cache, max(len(q) for q in seqs)
    more = [[25, 26]]
    logp = lm.extend(state, more, 1, budget=8)
    if gone == 6:
        assert state.cache is buffers and state.length == length > longest
    else:
        assert state.cache is not buffers and state.length == longest
    assert torch.allclose(logp, from_scratch(lm.model, more), atol=TOL64, rtol=0)
    seqs += [list(more[0])]
    tok = torch.arange(4) + 45
    seqs = [q + [t] for q, t in zip(seqs, tok.tolist(), strict=True)]
    logp = lm.step(state, tok)
    assert torch.allclose(logp, from_scratch(lm.model, seqs), atol=TOL64, rtol=0)


def test_a_batch_that_never_empties_holds_bounded_slots():
    """A scheduler kept busy (a server under steady load: a new system joins whenever one
    finishes) on the static cache: the state's slots stay within twice the longest system's
    prompt and answer, instead of growing by one every step for as long as the batch lives."""
    lm = tiny_lm("llama", "static", dtype=torch.float32)
    sched = Scheduler(lm)
    live, lengths = [], []
    for t in range(240):
        live = [h for h in live if not h.done]
        while len(live) < 3:
            prompt = list(range(1, 4 + (t + len(live)) % 4))  # 3 .. 6 tokens
            live.append(sched.submit(prompt, particles=4, max_new_tokens=10, seed=t))
        sched.step()
        state = sched.engine.state
        lengths.append(0 if state is None else state.length)
    runs = "".join("x" if n else " " for n in lengths).split()
    assert max(map(len, runs)) > 3 * (6 + 10)  # steps in a row the batch never emptied
    assert max(lengths) <= 2 * (6 + 10 + 1)
