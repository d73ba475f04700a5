"""Power-SMC's standard order (Algorithm 1) against the fully adapted order, at equal N.

Usage: python benchmarks/adapted_order.py [--runs 4000] [--particles 4,8,16,64]
       [--model-prompts 12] [--model-tokens 96] [--backend llama.cpp] [--out DIR]

Part 1, enumerable toy LMs (exact pi_alpha): for each N and order, `--runs` independent runs
(same seeds for both orders); reported: TV between the raw output's empirical distribution and
pi_alpha (with the TV of `--runs` exact draws from pi_alpha, the Monte Carlo floor), the
variance of log Z_hat, and mean Z_hat / Z (1 for an unbiased estimate). Defaults: systematic
resampling at ESS < N/2, alpha = 4.

Part 2, the default model on built-in prompts, N = 16, alpha = 4, the same seeds for both
orders: per answer, the mean ESS over its steps, the resampling count, the number of distinct
final particles, and the genealogy: the mean over t of the number of distinct prefixes
y_{1:t} among the final particles (how many ancestors survive, averaged over the answer).

These are statistics, not timings: both orders run the same forward passes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

from powersmc import FunctionLM, smc_sample_many
from powersmc.exact import power_distribution, total_variation
from powersmc.methods.options import ORDERS

ALPHA = 4.0
PROMPT = [3]


def _trap(prefix: tuple[int, ...]) -> list[float]:
    """The trap of tests/toy_models.py: A is rare but confident, B likely but uncertain."""
    gen = prefix[1:]
    if not gen:
        return [math.log(1e-3), math.log(0.4), math.log(0.6 - 1e-3), -math.inf]
    if gen[0] == 1:
        return [math.log(0.3), math.log(0.65), math.log(0.03), math.log(0.02)]
    return [math.log(0.25)] * 4


def _random(concentration: float):
    def logits(prefix: tuple[int, ...]) -> list[float]:
        rng = random.Random(hash(prefix) ^ 0x5EED)
        return [math.log(rng.gammavariate(concentration, 1.0) + 1e-9) for _ in range(4)]
    return logits


TOYS = {  # name: (conditionals, horizon)
    "trap (T=4)": (_trap, 4),
    "random (T=4)": (_random(0.6), 4),
    "random (T=7)": (_random(1.0), 7),
}


def _floor(pi: dict, runs: int, reps: int = 20) -> float:
    """Mean TV of the empirical distribution of `runs` exact draws from pi (the MC floor)."""
    keys, probs = list(pi), list(pi.values())
    rng = random.Random(0)
    tvs = []
    for _ in range(reps):
        c = Counter(rng.choices(range(len(keys)), probs, k=runs))
        tvs.append(total_variation({keys[i]: n / runs for i, n in c.items()}, pi))
    return statistics.fmean(tvs)


def toy_part(runs: int, particles: list[int]) -> list[dict]:
    rows = []
    for name, (fn, horizon) in TOYS.items():
        lm = FunctionLM(fn, vocab_size=4, eos_token_ids=[0])
        pi, log_z = power_distribution(lm, PROMPT, horizon, ALPHA)
        floor = _floor(pi, runs)
        for n in particles:
            for order in ORDERS:
                out = []
                for k in range(0, runs, 500):
                    out += smc_sample_many(lm, [PROMPT] * min(500, runs - k), alpha=ALPHA,
                                           particles=n, max_new_tokens=horizon, order=order,
                                           seed=1_000 + k)
                emp = Counter(tuple(r.token_ids) for r in out)
                lz = [r.log_z - log_z for r in out]
                row = {"model": name, "N": n, "order": order, "runs": runs,
                       "tv_raw": total_variation({k: v / runs for k, v in emp.items()}, pi),
                       "tv_floor": floor, "var_log_z": statistics.variance(lz),
                       "mean_z_ratio": statistics.fmean(math.exp(v) for v in lz),
                       "resamples_per_run": statistics.fmean(len(r.resample_steps) for r in out)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _genealogy(particles) -> float:
    """Mean over t of the number of distinct prefixes y_{1:t} among the final particles."""
    longest = max(len(p.token_ids) for p in particles)
    counts = [len({tuple(p.token_ids[:t]) for p in particles}) for t in range(1, longest + 1)]
    return statistics.fmean(counts)


def model_part(prompts: int, tokens: int, backend: str, threads: int | None) -> list[dict]:
    from powersmc.eval.builtin import builtin_problems
    from powersmc.models import load_model

    lm = load_model(backend=backend, threads=threads, chat=False)  # few-shot text, as in eval
    rows = []
    for p in builtin_problems()[:prompts]:
        for order in ORDERS:
            r = smc_sample_many(lm, [p.question], alpha=ALPHA, particles=16, max_new_tokens=tokens,
                                order=order, seed=7)[0]
            row = {"problem": p.id, "order": order, "tokens": len(r.token_ids),
                   "mean_ess": statistics.fmean(r.ess), "resamples": len(r.resample_steps),
                   "distinct_particles": len({tuple(q.token_ids) for q in r.particles}),
                   "mean_ancestors": _genealogy(r.particles), "log_z": r.log_z}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _summary(toy: list[dict], model: list[dict]) -> str:
    lines = ["| toy LM | N | TV raw, standard | TV raw, adapted | MC floor | var log Ẑ, std "
             "| var log Ẑ, adapted | mean Ẑ/Z std / adapted |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["N"], r["order"]): r for r in toy}
    for (m, n, o), r in by.items():
        if o != "standard":
            continue
        a = by[(m, n, "adapted")]
        lines.append(f"| {m} | {n} | {r['tv_raw']:.4f} | {a['tv_raw']:.4f} | "
                     f"{r['tv_floor']:.4f} | {r['var_log_z']:.4f} | {a['var_log_z']:.4f} | "
                     f"{r['mean_z_ratio']:.3f} / {a['mean_z_ratio']:.3f} |")
    if model:
        lines += ["", "| default model, N = 16 | standard | adapted |", "|---|---|---|"]
        for key in ("mean_ess", "resamples", "distinct_particles", "mean_ancestors", "tokens"):
            vals = {o: statistics.fmean(r[key] for r in model if r["order"] == o)
                    for o in ORDERS}
            lines.append(f"| {key} (mean over {len(model) // 2} prompts) | "
                         f"{vals['standard']:.2f} | {vals['adapted']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--particles", default="4,8,16,64")
    ap.add_argument("--model-prompts", type=int, default=12, help="0: skip the model part")
    ap.add_argument("--model-tokens", type=int, default=96)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench-out/adapted-order")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    toy = toy_part(args.runs, [int(x) for x in args.particles.split(",")])
    model = model_part(args.model_prompts, args.model_tokens, args.backend, args.threads) \
        if args.model_prompts else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapted_order.json").write_text(json.dumps({"toy": toy, "model": model,
                                                        "argv": sys.argv[1:]}, indent=1))
    table = _summary(toy, model)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
