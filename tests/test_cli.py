"""CLI contract: bad input exits 2 with one line naming the argument, and no traceback;
stdout is the result (with --json exactly one JSON document), stderr the log."""

import json
import os
import subprocess
import sys

import pytest

import powersmc

QUICK = ("--prompt", "What is 2 + 3?", "--particles", "2", "--max-new-tokens", "4", "--seed",
         "0", "--no-progress")


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "powersmc", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _json_stdout(r):
    """The whole of stdout parsed as one JSON document (not its last line)."""
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("args,needle", [
    (["sample", "--prompt", "hi", "--alpha", "0.5"], "alpha"),
    (["sample", "--prompt", "hi", "--particles", "0"], "--particles"),
    (["sample", "--prompt", "hi", "--ess-threshold", "2"], "--ess-threshold"),
    (["sample", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["sample", "--prompt", "   "], "prompt"),
    (["sample", "--prompt", "hi", "--method", "beam"], "method"),
    (["sample", "--prompt", "hi", "--resampler", "x"], "--resampler"),
    (["sample", "--prompt", "hi", "--rounds", "0"], "--rounds"),
    (["sample", "--prompt", "hi", "--order", "reverse"], "--order"),
    (["sample", "--prompt", "hi", "--resample-align", "0"], "--resample-align"),
    (["sample", "--prompt", "hi", "--method", "bon", "--bon-samples", "0"], "--bon-samples"),
    (["sample", "--prompt", "hi", "--select", "best"], "select"),
    (["sample", "--prompt", "hi", "--method", "mh", "--select", "consensus"], "--select"),
    (["sample", "--prompt", "hi", "--method", "ppt", "--alphas", "3,2"], "--alphas"),
    (["sample", "--prompt", "hi", "--method", "ppt", "--alphas", "0.5,2"], "--alphas"),
    (["sample", "--prompt", "hi", "--method", "ppt", "--alphas", "a,b"], "--alphas"),
    (["sample", "--prompt", "hi", "--method", "ecmh", "--cut-power", "-1"], "--cut-power"),
    (["sample", "--prompt", "hi", "--method", "ppt", "--mh-moves", "-1"], "--mh-moves"),
    (["sample", "--prompt", "hi", "--method", "smc-rm", "--rejuvenate-moves", "-2"],
     "--rejuvenate-moves"),
    (["sample", "--prompt", "hi", "--method", "plain", "--trace", "t.png"], "--trace"),
    (["sample", "--prompt-file", "/no/such/file"], "--prompt-file"),
    (["sample", "--prompt", "hi", "--model", "./missing.gguf"], "model"),
    (["sample", "--prompt", "hi", "--particles", "many"], "--particles"),
    (["sample", "--prompt", "hi", "--compile", "off"], "compile"),  # llama.cpp: no compile
    (["sample", "--prompt", "hi", "--compile", "maybe"], "--compile"),
    (["eval", "--dataset", "./missing.jsonl", "--out", "x"], "dataset"),
    (["eval", "--dataset", "builtin", "--methods", "smc,nope", "--out", "x"], "method"),
    (["eval", "--dataset", "builtin", "--seeds", "a", "--out", "x"], "--seeds"),
    (["eval", "--dataset", "builtin", "--batch-prompts", "0", "--out", "x"], "--batch-prompts"),
    (["eval", "--dataset", "builtin", "--budget", "0", "--out", "x"], "--budget"),
    (["eval", "--dataset", "builtin", "--methods", "mh,ppt", "--select", "vote", "--out", "x"],
     "--select"),
    (["eval", "--dataset", "builtin", "--workers", "0", "--out", "x"], "--workers"),
    (["eval", "--dataset", "builtin", "--ray-address", "h:1", "--out", "x"], "--ray-address"),
    (["eval", "--dataset", "builtin", "--workers", "2", "--device", "cuda:1", "--out", "x"],
     "--device"),
    (["report", "/no/such/dir"], "DIR"),
    (["bench", "--batches", "2,4"], "--batches"),
    (["sample"], "--prompt"),
])
def test_bad_input_exit_code_2(args, needle, capsys):
    """In process (`main`, as the console script runs it): exit code 2, one error line
    naming the argument; an unexpected exception would fail the test."""
    from powersmc.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and needle in lines[0]


@pytest.mark.parametrize("args,needle", [
    (["sample", "--prompt", "hi", "--particles", "0"], "--particles"),  # ours
    (["sample", "--prompt", "hi", "--particles", "many"], "--particles"),  # argparse's
])
def test_bad_input_exit_code_2_as_a_process(args, needle):
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


def test_version():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout == f"powersmc {powersmc.__version__}\n"


def test_result_stream_sends_everything_else_on_stdout_to_stderr():
    """While a command runs, prints, loggers bound to sys.stdout and C-level writes to fd 1
    reach stderr; only what the command writes to its result stream reaches stdout."""
    code = """if True:
        import logging, os, sys
        from powersmc.cli import result_stream
        with result_stream() as out:
            print("a print")
            logging.basicConfig(stream=sys.stdout, level=logging.INFO, force=True)
            logging.getLogger("lib").info("a logger")
            os.write(1, b"a C library\\n")
            out.write('{"result": 1}\\n')
        print("after")
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == '{"result": 1}\nafter\n'
    assert all(s in r.stderr for s in ("a print", "a logger", "a C library"))


@pytest.mark.model
@pytest.mark.parametrize("backend", ["llama.cpp", "transformers"])
def test_sample_json_is_the_whole_of_stdout(backend):
    doc = _json_stdout(_cli("sample", "--backend", backend, *QUICK, "--json", timeout=300))
    assert doc["method"] == "smc" and isinstance(doc["text"], str)


@pytest.mark.model
def test_log_level_debug_brings_llama_cpp_log_back_on_stderr():
    r = _cli("--log-level", "debug", "sample", "--backend", "llama.cpp", *QUICK, "--json",
             timeout=300)
    assert _json_stdout(r)["method"] == "smc"
    assert "powersmc.llama_cpp" in r.stderr and "llama_model_loader" in r.stderr
    quiet = _cli("sample", "--backend", "llama.cpp", *QUICK, "--json", timeout=300)
    assert "llama_model_loader" not in quiet.stderr


@pytest.mark.model
def test_eval_and_report_json_is_the_whole_of_stdout(tmp_path):
    out = str(tmp_path / "run")
    doc = _json_stdout(_cli("eval", "--dataset", "builtin", "--limit", "1", "--methods",
                            "greedy", "--max-new-tokens", "2", "--no-progress", "--json",
                            "--out", out, timeout=300))
    assert [r["method"] for r in doc["summary"]] == ["greedy"] and doc["workers"] is None
    assert _json_stdout(_cli("report", out, "--json")) == {"summary": doc["summary"]}
    text = _cli("report", out)
    assert text.returncode == 0 and "| greedy |" in text.stdout
