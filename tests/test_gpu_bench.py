"""benchmarks/gpu_bench.py as a CPU smoke test (`--tiny`), in a process where vLLM and
llama-cpp-python cannot be imported (the GPU machine has neither): every import of them on
the package's and the benchmark's paths must be lazy."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = "import sys; sys.modules['vllm'] = None; sys.modules['llama_cpp'] = None; "


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-W", "ignore", "-c", BLOCK + code, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_import_needs_neither_vllm_nor_llama_cpp():
    r = _run("import powersmc, powersmc.cli, powersmc.bench; "
             "from powersmc.backends import transformers_lm; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_gpu_bench_tiny_smoke(tmp_path):
    r = _run("import runpy; "
             "runpy.run_path('benchmarks/gpu_bench.py', run_name='__main__')",
             "--tiny", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert not res["errors"] and not res["skipped"]
    runs = res["runs"]["8"]
    for cache in ("static", "dynamic"):
        v = runs[cache]
        assert all(v[k] > 0 for k in ("single", "batched", "smc"))
        assert v["smc_over_single"] == v["smc"] / v["single"]
        assert res["profile"][cache]["forward"] > 0
        assert set(res["s"][cache]) == {"1", "4"}
    assert "SMC / single" in r.stdout
