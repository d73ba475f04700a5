"""`powersmc eval` on Ray workers, on a local CPU cluster with a toy model (`ray_toys`): the same
rows as one process, and faults (a killed worker, a unit that keeps failing, a killed driver)
that lose and duplicate nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ray_cluster import local_ray  # noqa: E402
from ray_toys import KW, SPEC, faulty_lm, problems, rows  # noqa: E402

from powersmc.eval.ray_pool import WorkerPool  # noqa: E402
from powersmc.eval.report import report  # noqa: E402
from powersmc.eval.runner import run_eval  # noqa: E402
from powersmc.eval.store import key_of, read_results  # noqa: E402

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 8 logical CPUs (a toy worker reserves one).
    Yields its address."""
    with local_ray(8) as address:
        yield address


@pytest.fixture(scope="module")
def pool(cluster):
    """Two toy workers, shared by this module's tests."""
    with WorkerPool(SPEC, 2) as p:
        yield p


def _stats(out: Path) -> dict:
    return json.loads((out / "workers.json").read_text())


def test_two_workers_give_the_rows_of_one_worker_and_of_one_process(pool, tmp_path):
    here = run_eval(faulty_lm(), problems(), out_dir=tmp_path / "here", **KW)
    one = run_eval(SPEC, problems(), out_dir=tmp_path / "one", workers=1, **KW)
    two = run_eval(pool, problems(), out_dir=tmp_path / "two", **KW)
    assert len(here) == 36 and rows(one) == rows(two) == rows(here)
    stats = _stats(tmp_path / "two")
    assert all(w["answers"] > 0 and w["threads"] == 1 and w["restarts"] == 0
               for w in stats["workers"]) and len(stats["workers"]) == 2
    assert sum(w["answers"] for w in stats["workers"]) == stats["answers"] == 36
    # Power-SMC 4 problems at a time in one scheduler: every (problem, seed) keeps its own
    # seed, so the rows equal those run one at a time, here and on the workers
    here4 = run_eval(faulty_lm(), problems(), out_dir=tmp_path / "here4", batch_prompts=4, **KW)
    two = run_eval(pool, problems(), out_dir=tmp_path / "two4", batch_prompts=4, **KW)
    assert rows(two) == rows(here4) == rows(here)
    assert "| smc |" in report(tmp_path / "two4") and "4 problems at once" in report(
        tmp_path / "two4")


def test_budget_is_calibrated_on_the_workers_as_in_one_process(pool, tmp_path):
    """`--budget` with workers: the calibration's points run as units on the workers and give
    the figures and knobs of the calibration in one process, and then the same rows."""
    kw = {**KW, "methods": ["smc", "maj", "bon", "mh"], "seeds": [0],
          "options": {"num_blocks": 2}, "budget": 4}
    here = run_eval(faulty_lm(), problems(8), out_dir=tmp_path / "here", **kw)
    two = run_eval(pool, problems(8), out_dir=tmp_path / "two", **kw)
    calibration = [json.loads((tmp_path / d / "config.json").read_text())["budget"]
                   for d in ("here", "two")]
    assert calibration[0] == calibration[1]
    assert set(calibration[0]["points"]) == {"maj", "bon", "mh"}
    assert len(here) == 32 and rows(two) == rows(here)


def test_a_killed_worker_loses_and_duplicates_nothing(pool, tmp_path):
    marker = tmp_path / "killed"
    probs = problems(extra=(f"kill-once {marker}",))
    marker.touch()  # the reference run kills nothing
    here = run_eval(faulty_lm(), probs, out_dir=tmp_path / "here", **KW)
    marker.unlink()
    got = run_eval(pool, probs, out_dir=tmp_path / "run", **KW)
    assert marker.exists() and len(here) == 42 and rows(got) == rows(here)
    assert rows(read_results(tmp_path / "run" / "results.jsonl")) == rows(here)
    assert sum(w["restarts"] for w in _stats(tmp_path / "run")["workers"]) == 1
    assert not (tmp_path / "run" / "failures.jsonl").exists()


def test_a_unit_that_keeps_failing_is_recorded_and_a_rerun_tries_it_again(pool, tmp_path):
    """A unit that raises and one that kills its worker (three times) are recorded with their
    error and the run goes on; a re-run tries both again: the one that now succeeds gets its
    result and leaves the report's failed list."""
    survive = tmp_path / "survive"
    probs = problems(2, extra=("raise", f"die {survive}"))
    kw = {**KW, "methods": ["plain"], "seeds": [0]}
    out = tmp_path / "run"
    got = run_eval(pool, probs, out_dir=out, **kw)
    assert sorted(r["problem_id"] for r in got) == ["p0", "p1"]
    failed = {f["problem_id"]: f for f in read_results(out / "failures.jsonl")}
    assert failed["x0"]["error"] == "ValueError: this problem always fails"
    assert failed["x1"]["error"].startswith("worker died")
    assert failed["x0"]["attempts"] == failed["x1"]["attempts"] == 3 and len(failed) == 2
    stats = _stats(out)
    assert sum(w["restarts"] for w in stats["workers"]) == 3
    assert sum(w["failed_units"] for w in stats["workers"]) == 2
    text = report(out)
    assert "## Failed units (2)" in text and "| x1 | plain | 0 | 3 | worker died" in text

    survive.touch()
    again = run_eval(pool, probs, out_dir=out, **kw)
    keys = [key_of(r) for r in read_results(out / "results.jsonl")]
    assert len(keys) == len(set(keys)) == len(again) == 3 and ("x1", "plain", 0) in keys
    assert len(read_results(out / "failures.jsonl")) == 3  # x0 failed once more
    text = report(out)
    assert "## Failed units (1)" in text and "| x0 | plain | 0 | 3 | ValueError" in text


def test_a_killed_driver_resumes_with_nothing_lost_or_duplicated(pool, cluster, tmp_path):
    """A driver joining this cluster by its address is SIGKILLed after some rows, its last line
    cut; running the same evaluation again completes it: every row once, as one process
    writes them."""
    here = run_eval(faulty_lm(), problems(), out_dir=tmp_path / "here", **KW)
    out = tmp_path / "run"
    cmd = [sys.executable, str(TESTS / "ray_driver.py"), str(out), cluster]
    proc = subprocess.Popen(cmd, start_new_session=True)
    path, deadline = out / "results.jsonl", time.time() + 120
    while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= 5):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(read_results(path)) < 36
    with path.open("a") as fh:  # a line cut off mid-write
        fh.write('{"problem_id": "p9", "meth')
    got = run_eval(pool, problems(), out_dir=out, **KW)
    keys = [key_of(r) for r in read_results(path)]
    assert len(keys) == len(set(keys)) == 36 and rows(got) == rows(here)


@pytest.mark.model
def test_cli_eval_on_two_workers_writes_the_rows_of_one_process(tmp_path):
    """The real CLI on the default model: `--workers 2` (a local Ray cluster of its own, each
    worker loading the GGUF) gives the rows of the in-process run with the same threads."""
    args = [sys.executable, "-m", "powersmc", "eval", "--dataset", "builtin", "--limit", "2",
            "--methods", "greedy,plain", "--max-new-tokens", "8", "--threads", "1",
            "--no-progress"]
    here = subprocess.run([*args, "--out", str(tmp_path / "here")], capture_output=True,
                          text=True, timeout=300)
    two = subprocess.run([*args, "--workers", "2", "--json", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert here.returncode == 0 and two.returncode == 0, two.stderr
    assert rows(read_results(tmp_path / "two" / "results.jsonl")) == rows(
        read_results(tmp_path / "here" / "results.jsonl"))
    assert "| greedy |" in here.stdout
    doc = json.loads(two.stdout)  # the whole of stdout: Ray's log is on stderr
    assert doc["workers"]["answers"] == 4 and len(doc["workers"]["workers"]) == 2
    assert [r["method"] for r in doc["summary"]] == ["greedy", "plain"]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config == json.loads((tmp_path / "here" / "config.json").read_text())


def test_an_address_where_no_cluster_answers_is_refused_at_once(tmp_path):
    r = subprocess.run([sys.executable, "-m", "powersmc", "eval", "--dataset", "builtin",
                        "--workers", "1", "--ray-address", "127.0.0.1:1",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("powersmc eval: error: --ray-address: host:port of a running Ray")
