"""Programs on the one Scheduler, measured on a real model: (1) K MH chains in flight share
forward passes; (2) Power-SMC requests beside an MH request in flight keep their latency.

Usage: python benchmarks/programs_batching.py [--chains 8] [--smc 3] [--particles 16]
       [--max-new-tokens 64] [--blocks 4] [--moves 5] [--threads 2] [-- load_model flags]

(1) MH (T = --max-new-tokens, --blocks x --moves) on the first --chains GSM8K test questions:
each chain alone on a fresh `Scheduler` (its forward passes), then all chains started together
on one (the scheduler's steps): the ratio is what `powersmc eval --batch-prompts K` pays in
forward passes against one problem's run. (2) --smc Power-SMC requests (N = --particles,
same T) submitted together, alone, then again with one MH request started first; each
request's latency is submit-to-answer wall time (the server's worker runs this loop). Seeds
are fixed, so both runs draw the same SMC answers. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from powersmc import Scheduler, load_model
from powersmc.methods.registry import method_program
from powersmc.runtime.api import run_program

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


def questions(k: int) -> list[str]:
    with open(DATA) as fh:
        return [json.loads(line)["question"] for line, _ in zip(fh, range(k), strict=False)]


def smc_latencies(lm, prompts: list[str], args, mh_prompt: str | None) -> list[float]:
    sched = Scheduler(lm)
    if mh_prompt is not None:
        sched.start(method_program("mh", lm, mh_prompt, alpha=4.0, seed=99,
                                   max_new_tokens=args.max_new_tokens,
                                   num_blocks=args.blocks, mh_moves=args.moves))
        sched.step()  # the chain is in flight when the SMC requests arrive
    start = time.perf_counter()
    hs = [sched.submit(p, alpha=4.0, particles=args.particles, seed=k,
                       max_new_tokens=args.max_new_tokens) for k, p in enumerate(prompts)]
    done: dict[int, float] = {}
    while len(done) < len(hs):
        sched.step()
        for i, h in enumerate(hs):
            if h.done and i not in done:
                done[i] = time.perf_counter() - start
                h.result()
    sched.close()
    return [done[i] for i in range(len(hs))]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--smc", type=int, default=3)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--moves", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    lm = load_model(threads=args.threads)
    qs = questions(args.chains + args.smc + 1)
    kw = dict(alpha=4.0, max_new_tokens=args.max_new_tokens, num_blocks=args.blocks,
              mh_moves=args.moves)
    solo = []
    for k, q in enumerate(qs[: args.chains]):
        r = run_program(lm, method_program("mh", lm, q, seed=k, **kw))
        solo.append(r.cost.forward_passes)
        print(f"chain {k} alone: {r.cost.forward_passes} passes", file=sys.stderr)
    sched = Scheduler(lm)
    t0 = time.perf_counter()
    hs = [sched.start(method_program("mh", lm, q, seed=k, **kw))
          for k, q in enumerate(qs[: args.chains])]
    sched.run()
    together_s = time.perf_counter() - t0
    together = [h.result().cost.forward_passes for h in hs]
    sched.close()
    smc_prompts, mh_prompt = qs[args.chains : args.chains + args.smc], qs[-1]
    alone = smc_latencies(lm, smc_prompts, args, None)
    beside = smc_latencies(lm, smc_prompts, args, mh_prompt)
    out = {
        "settings": vars(args),
        "mh_chains": {"solo_passes": solo, "together_steps": sched.steps,
                      "together_passes_per_chain": together, "together_seconds": together_s,
                      "steps_over_mean_solo": sched.steps / statistics.mean(solo),
                      "steps_over_max_solo": sched.steps / max(solo)},
        "smc_latency": {"alone_s": alone, "beside_mh_s": beside,
                        "ratio_mean": statistics.mean(beside) / statistics.mean(alone),
                        "ratio_max": max(b / a for a, b in zip(alone, beside, strict=True))},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
