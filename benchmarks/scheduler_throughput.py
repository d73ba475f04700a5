"""Continuous admission against batch-synchronous batches and one problem at a time, side by side
in one run, on problems whose answers vary in length; and the scheduler's own time per step.

Usage: python benchmarks/scheduler_throughput.py [--problems 32] [--tokens 128] [--particles 16]
       [--in-flight 4,8] [--threads 2] [--out DIR]

The first `--problems` GSM8K test questions (`--data`, default ../shared/data/gsm8k_test.jsonl),
rendered with the evaluation's chat template, each answered by Power-SMC (alpha 4, N particles,
T tokens, EOS ends a particle) with the seed `powersmc eval` derives for it, on the default
model (llama.cpp). Modes, all through one `Scheduler` each:
  * one       one problem at a time;
  * sync-P    batch-synchronous, as `--batch-prompts P` ran before the scheduler: P problems
              start together and the next P start when the longest of them has finished;
  * cont-P    continuous admission, as `--batch-prompts P` runs now: P systems in flight, the
              next problem joins the running batch as soon as one finishes.
Every system has its own derived seed, so all modes compute the same answers on a batch-
invariant model; here the batched forward may differ from a solo one in the last float bits
(the script reports how many answers differ from `one`). Printed: answers per minute and the
ratios to `one` and to `sync-P`. Then a profile of the scheduler's step at `--profile-rows`
live rows: the model's forward (and prefill), the token draw, and the scheduler's own time
(admission, Algorithm 1's bookkeeping for every system, the host transfer, retiring).
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from powersmc import Scheduler, load_model
from powersmc.eval.data import load_problems
from powersmc.eval.prompts import TEMPLATES, render
from powersmc.eval.units import derived_seed


def run_mode(lm, prompts, seeds, opts, in_flight: int, synchronous: bool) -> dict:
    """All prompts through one scheduler, `in_flight` at a time (refilled continuously, or
    only when the whole group has finished)."""
    sched = Scheduler(lm)
    todo = list(range(len(prompts)))
    live, texts, start = {}, {}, time.perf_counter()
    while todo or live:
        if not live or not synchronous:
            while todo and len(live) < in_flight:
                k = todo.pop(0)
                live[sched.submit(prompts[k], seed=seeds[k], **opts)] = k
        sched.step()
        for h in [h for h in live if h.done]:
            texts[live.pop(h)] = h.result().token_ids
    seconds = time.perf_counter() - start
    sched.close()
    return {"seconds": seconds, "answers_per_minute": 60 * len(prompts) / seconds,
            "tokens": [texts[k] for k in range(len(prompts))], "steps": sched.steps}


def profile(lm, prompts, seeds, opts, rows: int, steps: int = 60) -> dict:
    """Time the scheduler's steps while about `rows` particles are live: the model's forward
    and prefill, the engine's draw, and the rest (the scheduler's own work)."""
    sched = Scheduler(lm)
    engine = sched.engine
    spent = {"model": 0.0, "draw": 0.0}
    model_step, model_prefill, model_extend = lm.step, lm.prefill_many, lm.extend
    draw_all = engine._draw_all

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    lm.step, lm.prefill_many, lm.extend = (timed("model", f) for f in
                                           (model_step, model_prefill, model_extend))
    engine._draw_all = timed("draw", draw_all)
    per = opts["particles"]
    k, samples = 0, []
    try:
        while k < len(prompts) or not sched.idle:
            while k < len(prompts) and sched.live_rows + per <= rows and len(sched.waiting) == 0:
                sched.submit(prompts[k], seed=seeds[k], **opts)
                k += 1
            before = dict(spent)
            live = sched.live_rows
            t = time.perf_counter()
            sched.step()
            total = time.perf_counter() - t
            if live >= rows - per:  # a step at (about) the target size
                model = spent["model"] - before["model"]
                draw = spent["draw"] - before["draw"]
                samples.append((total, model, draw, live))
            if len(samples) >= steps:
                break
    finally:
        lm.step, lm.prefill_many, lm.extend = model_step, model_prefill, model_extend
        sched.close()
    tot = sum(s[0] for s in samples)
    own = sum(s[0] - s[1] - s[2] for s in samples)
    return {"steps": len(samples), "mean_rows": statistics.mean(s[3] for s in samples),
            "step_ms": 1e3 * tot / len(samples),
            "model_share": sum(s[1] for s in samples) / tot,
            "draw_share": sum(s[2] for s in samples) / tot,
            "scheduler_share": own / tot, "scheduler_ms": 1e3 * own / len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--in-flight", default="4,8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile-rows", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "gsm8k_test.jsonl"))
    args = ap.parse_args()
    problems = load_problems(args.data, limit=args.problems)
    prompts = [render(TEMPLATES["chat"], p.question) for p in problems]
    seeds = [derived_seed(0, p.id) for p in problems]
    lm = load_model(threads=args.threads)
    opts = dict(alpha=4.0, particles=args.particles, max_new_tokens=args.tokens)
    print(f"model={lm.name} problems={len(prompts)} N={args.particles} T={args.tokens}",
          flush=True)
    out: dict = {"settings": vars(args), "modes": {}}
    sizes = [int(p) for p in args.in_flight.split(",")]
    plan = [("one", 1, False)] + [(f"{m}-{p}", p, m == "sync") for p in sizes
                                  for m in ("sync", "cont")]
    for name, p, sync in plan:
        r = run_mode(lm, prompts, seeds, opts, p, sync)
        out["modes"][name] = r
        same = sum(a == b for a, b in zip(r["tokens"], out["modes"]["one"]["tokens"],
                                          strict=True))
        print(f"{name:>8}: {r['seconds']:7.1f} s, {r['answers_per_minute']:6.2f} answers/min, "
              f"{r['steps']} steps, answers equal to 'one': {same}/{len(prompts)}", flush=True)
    base = out["modes"]["one"]["answers_per_minute"]
    for p in sizes:
        c, s = out["modes"][f"cont-{p}"], out["modes"][f"sync-{p}"]
        print(f"P={p}: continuous {c['answers_per_minute'] / base:.2f}x one-at-a-time, "
              f"{c['answers_per_minute'] / s['answers_per_minute']:.2f}x batch-synchronous "
              f"(which is {s['answers_per_minute'] / base:.2f}x one-at-a-time)")
    prof = profile(lm, prompts * 4, seeds * 4, opts, args.profile_rows)
    out["profile"] = prof
    print(f"profile at {prof['mean_rows']:.0f} live rows ({prof['steps']} steps): "
          f"{prof['step_ms']:.1f} ms per step; model {100 * prof['model_share']:.1f}%, "
          f"draw {100 * prof['draw_share']:.1f}%, scheduler {100 * prof['scheduler_share']:.1f}% "
          f"({prof['scheduler_ms']:.2f} ms)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for r in out["modes"].values():
            r.pop("tokens")
        (Path(args.out) / "scheduler_throughput.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
