"""`powersmc eval` on Ray workers against one process, side by side in one run.

Usage: python benchmarks/ray_workers.py [--limit 8] [--methods plain,smc] [--tokens 64]
       [--particles 8] [--repeats 3] [--cheap-units 200] [--json FILE]

Throughput: the same slice of the built-in set (default model) in one process with all cores
as threads, on K = 1 Ray worker with all cores, and on K = cores workers with one thread each
(on a 2-core machine: 1 x 2 threads against 2 x 1 thread). Answers per minute count the run
itself (first dispatch to last row), not the start of the workers, which is printed apart.
Rounds alternate the order of the set-ups; the median per set-up is printed. Each timed run
follows a warm-up unit per worker.

Overhead: per-unit seconds of a trivially cheap unit (a toy model, greedy, one token) in one
process against one Ray worker; the difference is what the Ray path adds to every unit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from powersmc import FunctionLM
from powersmc.eval.data import Problem, load_problems
from powersmc.eval.ray_pool import WorkerPool
from powersmc.eval.runner import run_eval
from powersmc.models import ModelSpec


class CheapLM(FunctionLM):
    """Two tokens, the second one EOS, whatever the prompt: greedy stops after one token."""

    def encode_prompt(self, prompt):
        return [0]


def cheap_lm(threads: int | None = None) -> CheapLM:
    return CheapLM(lambda prefix: [0.0, 1.0], vocab_size=2, eos_token_ids=[1])


def timed(model, problems: list[Problem], out: Path, **kw) -> tuple[float, int]:
    """(seconds of the run itself, answers) for one evaluation into a fresh directory, after
    a warm-up unit per worker (first calls import the graders and warm the model)."""
    workers = model.workers if isinstance(model, WorkerPool) else 1
    warm = [Problem(f"warm{i}", problems[0].question, problems[0].answer, problems[0].kind)
            for i in range(workers)]
    run_eval(model, warm, out_dir=out.with_name(out.name + "-warm"), progress=False,
             **{**kw, "methods": kw["methods"][:1]})
    start = time.perf_counter()
    rows = run_eval(model, problems, out_dir=out, progress=False, **kw)
    seconds = model.stats["seconds"] if isinstance(model, WorkerPool) else (
        time.perf_counter() - start)
    return seconds, len(rows)


def throughput(args, cores: int, work: Path) -> dict:
    problems = load_problems("builtin", limit=args.limit)
    kw = dict(methods=args.methods.split(","), seeds=[0], template="{problem}",
              max_new_tokens=args.tokens, options={"particles": args.particles})
    load = dict(chat=False, device="cpu", backend=args.backend)
    setups = {f"1 process x {cores} threads": (None, cores),
              f"1 worker x {cores} threads": (1, cores),
              f"{cores} workers x 1 thread": (cores, 1)}
    per_minute: dict[str, list[float]] = {name: [] for name in setups}
    starts: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(args.repeats):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for name in order:
            workers, threads = setups[name]
            spec = ModelSpec({**load, "threads": threads})
            out = work / f"{r}-{name.replace(' ', '')}"
            start = time.perf_counter()
            if workers is None:
                model = spec.build()
                starts[name].append(time.perf_counter() - start)
                seconds, answers = timed(model, problems, out, **kw)
            else:
                with WorkerPool(spec, workers) as pool:
                    starts[name].append(time.perf_counter() - start)
                    seconds, answers = timed(pool, problems, out, **kw)
            per_minute[name].append(60 * answers / seconds)
            print(f"round {r}: {name}: {answers} answers in {seconds:.1f} s "
                  f"({per_minute[name][-1]:.1f}/min), start {starts[name][-1]:.1f} s",
                  flush=True)
    return {name: {"answers_per_minute": statistics.median(v), "runs": v,
                   "start_seconds": statistics.median(starts[name])}
            for name, v in per_minute.items()}


def overhead(args, work: Path) -> dict:
    problems = [Problem(f"c{i}", "x", "0", "number") for i in range(args.cheap_units)]
    kw = dict(methods=["greedy"], seeds=[0], template="{problem}", max_new_tokens=1)
    here, n = timed(cheap_lm(), problems, work / "cheap-here", **kw)
    with WorkerPool(ModelSpec({"threads": 1}, factory=cheap_lm), 1) as pool:
        there, _ = timed(pool, problems, work / "cheap-ray", **kw)
    return {"units": n, "in_process_ms": 1000 * here / n, "ray_ms": 1000 * there / n,
            "overhead_ms": 1000 * (there - here) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=8, help="problems of the built-in set")
    ap.add_argument("--methods", default="plain,smc")
    ap.add_argument("--tokens", type=int, default=64, help="max new tokens")
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cheap-units", type=int, default=200)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"cores": cores, "throughput": throughput(args, cores, Path(tmp)),
                  "overhead": overhead(args, Path(tmp))}
    ray.shutdown()
    print(f"\nThroughput ({args.limit} problems x {args.methods}, {args.tokens} tokens, "
          f"N={args.particles}; median of {args.repeats}):")
    for name, t in result["throughput"].items():
        print(f"  {name:24s} {t['answers_per_minute']:8.1f} answers/min "
              f"(model load or workers start: {t['start_seconds']:.1f} s)")
    o = result["overhead"]
    print(f"Per-unit overhead ({o['units']} one-token units): in process {o['in_process_ms']:.2f}"
          f" ms, one Ray worker {o['ray_ms']:.2f} ms: +{o['overhead_ms']:.2f} ms per unit")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
