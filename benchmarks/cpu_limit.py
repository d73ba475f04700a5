"""The default engine at the CPU's limit, side by side in one run: the cost per row of batching
P systems, per weight format; offline throughput by `max_systems`; and whether a seeded
system's answer depends on what shares its batch.

Usage: python benchmarks/cpu_limit.py [--formats f16,bf16,q8_0,file] [--sizes 1,4,16]
       [--step-tokens 32] [--problems 16] [--tokens 128] [--in-flight 4,8,16] [--threads 2]
       [--out DIR]

Default model (llama.cpp), GSM8K test questions (`--data`) in the evaluation's chat template,
Power-SMC at alpha 4 with N = 16 particles. Run it on an otherwise idle machine.

1. Step cost (per weight format, per P in `--sizes`): `smc_sample_many` on P prompts with
   EOS disabled (every row runs `--step-tokens` tokens), milliseconds per step and per row,
   and the per-row cost relative to P = 1; beside it, plain batched sampling of as many rows
   (16 samples of each of the P prompts at temperature 1/alpha, the Scheduler's decoding
   programs, run together) and the ratio SMC / plain. Both sides evaluate the same prompts,
   so the ratio compares the steps; the per-row costs include the prompts' share.
2. Throughput (the default weights): all `--problems` questions through one `Scheduler` with
   EOS on (T = `--tokens`), one problem at a time and then `max_systems` P for each P of
   `--in-flight`; answers per minute, the ratio to one at a time, and how many answers are
   token-for-token those of one at a time (every system has the seed `powersmc eval` derives
   for its problem, so only the batch differs).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from powersmc import Scheduler, load_model, smc_sample_many
from powersmc.bench import NoEOS
from powersmc.eval.data import load_problems
from powersmc.eval.prompts import TEMPLATES, render
from powersmc.eval.units import derived_seed
from powersmc.methods.decoding import decode_program
from powersmc.runtime.api import run_programs

ALPHA, N = 4.0, 16


def step_cost(lm, prompts: list[str], sizes: list[int], tokens: int) -> dict:
    """ms per step of Power-SMC over P prompts (and of plain sampling of as many rows)."""
    forced, out = NoEOS(lm), {}
    smc_sample_many(forced, prompts[:1], alpha=ALPHA, particles=N, max_new_tokens=4, seed=0)
    for p in sizes:
        t = time.perf_counter()
        smc_sample_many(forced, prompts[:p], alpha=ALPHA, particles=N, max_new_tokens=tokens,
                        seed=0)
        smc = time.perf_counter() - t
        t = time.perf_counter()
        run_programs(forced, [decode_program(forced, q, temperature=1 / ALPHA, num_samples=N,
                                             max_new_tokens=tokens, seed=0)
                              for q in prompts[:p]])
        plain = time.perf_counter() - t
        out[p] = {"smc_step_ms": 1e3 * smc / tokens, "plain_step_ms": 1e3 * plain / tokens,
                  "smc_row_ms": 1e3 * smc / tokens / (N * p), "smc_over_plain": smc / plain}
    for p in sizes:
        out[p]["per_row_vs_one"] = out[p]["smc_row_ms"] / out[sizes[0]]["smc_row_ms"]
    return out


def throughput(lm, prompts: list[str], seeds: list[int], tokens: int, p: int) -> dict:
    """All prompts through one scheduler, at most `p` systems in flight."""
    sched = Scheduler(lm, max_systems=p)
    start = time.perf_counter()
    handles = [sched.submit(q, seed=s, alpha=ALPHA, particles=N, max_new_tokens=tokens)
               for q, s in zip(prompts, seeds, strict=True)]
    sched.run()
    seconds = time.perf_counter() - start
    sched.close()
    return {"seconds": seconds, "answers_per_minute": 60 * len(prompts) / seconds,
            "tokens": [h.result().token_ids for h in handles]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="f16,bf16,q8_0,file")
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--in-flight", default="4,8,16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "gsm8k_test.jsonl"))
    args = ap.parse_args()
    problems = load_problems(args.data, limit=max(args.problems, 16))
    prompts = [render(TEMPLATES["chat"], p.question) for p in problems]
    seeds = [derived_seed(0, p.id) for p in problems]
    sizes = [int(x) for x in args.sizes.split(",")]
    out: dict = {"settings": vars(args), "machine": platform.processor() or platform.machine(),
                 "step_cost": {}, "throughput": {}}
    for fmt in args.formats.split(","):
        lm = load_model(threads=args.threads, weights=fmt)
        r = out["step_cost"][fmt] = step_cost(lm, prompts, sizes, args.step_tokens)
        for p, x in r.items():
            print(f"{fmt:>5} P={p:<3} SMC {x['smc_step_ms']:7.1f} ms/step "
                  f"({x['smc_row_ms']:.2f} ms/row, {x['per_row_vs_one']:.2f}x P=1's); plain "
                  f"{x['plain_step_ms']:7.1f} ms/step; SMC/plain {x['smc_over_plain']:.2f}",
                  flush=True)
        del lm
    lm = load_model(threads=args.threads)
    todo, todo_seeds = prompts[: args.problems], seeds[: args.problems]
    one = throughput(lm, todo, todo_seeds, args.tokens, 1)
    out["throughput"]["1"] = one
    print(f"one at a time: {one['answers_per_minute']:.2f} answers/min", flush=True)
    for p in [int(x) for x in args.in_flight.split(",")]:
        r = throughput(lm, todo, todo_seeds, args.tokens, p)
        same = sum(a == b for a, b in zip(r["tokens"], one["tokens"], strict=True))
        r["same_as_one"] = same
        r["vs_one"] = r["answers_per_minute"] / one["answers_per_minute"]
        out["throughput"][str(p)] = r
        print(f"max_systems {p:>2}: {r['answers_per_minute']:.2f} answers/min, "
              f"{r['vs_one']:.2f}x one at a time; answers equal to one at a time: "
              f"{same}/{len(todo)}", flush=True)
    if args.out:
        for r in out["throughput"].values():
            r.pop("tokens")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu_limit.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
