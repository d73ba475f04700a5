"""`run_bench` end to end on a toy backend (speed itself is measured by benchmarks, not tests)."""

import json

from toy_models import PROMPT, trap_lm

from powersmc.bench import NoEOS, run_bench
from powersmc.runtime.api import sample


def test_noeos_forces_length():
    r = sample(NoEOS(trap_lm()), PROMPT, num_samples=8, max_new_tokens=5, seed=0)
    assert all(len(s) == 5 for s in r.samples)


def test_run_bench_writes_reports(tmp_path):
    res = run_bench(trap_lm(), PROMPT, particles=4, tokens=6, alpha=4.0, repeats=2,
                    batches=[1, 2, 4], mh_tokens=4, mh_blocks=2, mh_moves=1, out_dir=tmp_path,
                    several=[PROMPT, [2]],
                    progress=lambda m: None)
    assert set(res["s"]) == {1, 2, 4} and res["s"][1] == 1.0
    assert res["smc"]["overhead"]["n"] == 2 and res["profile"]["forward"] > 0
    assert res["mh_vs_smc"]["smc_token_evals"] == 4 * 4  # N * mh_tokens, Lemma 1
    assert json.loads((tmp_path / "bench.json").read_text())["particles"] == 4
    md = (tmp_path / "bench.md").read_text()
    assert "SMC overhead" in md and "2 prompts × N = 4 in one batch" in md
    many = res["several_prompts"]
    assert many["prompts"] == 2 and many["gain"]["n"] == 2 and many["gain"]["median"] > 0
    assert (tmp_path / "batch_throughput.png").stat().st_size > 1000
