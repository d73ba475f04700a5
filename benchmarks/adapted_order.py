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
import statistics
import sys
from pathlib import Path

import torch
from toy_lms import ALPHA, TOYS, mc_floor, raw_output_stats, toy

from powersmc import smc_sample_many
from powersmc.methods.options import ORDERS


def toy_part(runs: int, particles: list[int]) -> list[dict]:
    rows = []
    for name in TOYS:
        _, _, pi, _ = toy(name)
        floor = mc_floor(pi, runs)
        for n in particles:
            for order in ORDERS:
                row = {**raw_output_stats(name, n, runs, order=order), "order": order,
                       "tv_floor": floor}
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
