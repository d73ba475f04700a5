"""CLI contract: bad input exits 2 with one line naming the argument, and no traceback."""

import os
import subprocess
import sys

import pytest


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "powersmc", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("args,needle", [
    (["sample", "--prompt", "hi", "--alpha", "0.5"], "alpha"),
    (["sample", "--prompt", "hi", "--particles", "0"], "particles"),
    (["sample", "--prompt", "hi", "--ess-threshold", "2"], "ess_threshold"),
    (["sample", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["sample", "--prompt", "   "], "prompt"),
    (["sample", "--prompt", "hi", "--method", "beam"], "method"),
    (["sample", "--prompt", "hi", "--resampler", "x"], "resampler"),
    (["sample", "--prompt", "hi", "--rounds", "0"], "rounds"),
    (["sample", "--prompt", "hi", "--order", "reverse"], "--order"),
    (["sample", "--prompt", "hi", "--resample-align", "0"], "--resample-align"),
    (["sample", "--prompt", "hi", "--method", "bon", "--bon-samples", "0"], "bon_samples"),
    (["sample", "--prompt", "hi", "--select", "best"], "select"),
    (["sample", "--prompt-file", "/no/such/file"], "--prompt-file"),
    (["sample", "--prompt", "hi", "--model", "./missing.gguf"], "model"),
    (["sample", "--prompt", "hi", "--particles", "many"], "--particles"),
    (["eval", "--dataset", "./missing.jsonl", "--out", "x"], "dataset"),
    (["eval", "--dataset", "builtin", "--methods", "smc,nope", "--out", "x"], "method"),
    (["eval", "--dataset", "builtin", "--seeds", "a", "--out", "x"], "--seeds"),
    (["eval", "--dataset", "builtin", "--batch-prompts", "0", "--out", "x"], "--batch-prompts"),
    (["eval", "--dataset", "builtin", "--workers", "0", "--out", "x"], "--workers"),
    (["eval", "--dataset", "builtin", "--ray-address", "h:1", "--out", "x"], "--ray-address"),
    (["eval", "--dataset", "builtin", "--workers", "2", "--device", "cuda:1", "--out", "x"],
     "--device"),
    (["report", "/no/such/dir"], "DIR"),
    (["bench", "--batches", "2,4"], "--batches"),
    (["sample"], "--prompt"),
])
def test_bad_input_exit_code_2(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in r.stderr


def test_workers_without_ray_names_the_extra(tmp_path):
    """Where Ray is not installed, --workers says how to install it (a `ray` package that
    fails to import stands in for the missing one)."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    r = _cli("eval", "--dataset", "builtin", "--workers", "2", "--out", str(tmp_path / "x"),
             env={**os.environ, "PYTHONPATH": path})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("powersmc eval: error: --workers: Ray, which is not installed: "
                                "pip install 'powersmc[ray]'")
    assert not (tmp_path / "x").exists()
