"""What deferring resampling to KV-block boundaries (`resample_align`) costs statistically.

Usage: python benchmarks/resample_align.py [--toy-runs 4000] [--toy-particles 4,8,16,64]
       [--toy-aligns 1,2,4,8] [--aligns 1,8,32] [--runs 40] [--tokens 64]
       [--particles 16] [--backend llama.cpp] [--out DIR]

Part 1, enumerable toy LMs (exact pi_alpha, EOS at every length), at equal N, the same seeds
for every alignment: TV between the drawn answer's empirical law over `--toy-runs` runs and
pi_alpha (with the Monte Carlo floor: the TV of as many exact draws), var log Z_hat, mean
Z_hat / Z and resamplings per run. The toys' horizons are 4 and 7 tokens, so alignment 8
never resamples (sequential importance sampling): what vLLM's 32-token block does to answers
shorter than a block.

Part 2, the default model on one prompt, N particles, alpha = 4, EOS off (every run decodes T
tokens), the same seeds for every alignment. Per alignment: the variance of log Z_hat over
the runs (the evidence estimate's spread: lower means a better-balanced particle system), the
mean ESS / N over the steps, resamplings per run and distinct final particles. Alignment 1 is
Algorithm 1; 32 is what `resample_align='block'` means on vLLM's CPU build. Statistics, not
timings: every alignment runs the same forward passes on this backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from toy_lms import TOYS, mc_floor, raw_output_stats, toy

from powersmc import load_model, smc_sample
from powersmc.bench import NoEOS

PROMPT = "Write a short story about a lighthouse keeper."


def toy_part(runs: int, particles: list[int], aligns: list[int]) -> list[dict]:
    rows = []
    for name in TOYS:
        floor = mc_floor(toy(name)[2], runs)
        for n in particles:
            for align in aligns:
                row = {**raw_output_stats(name, n, runs, resample_align=align),
                       "align": align, "tv_floor": floor}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def model_part(aligns: list[int], runs: int, tokens: int, particles: int, backend: str,
               threads: int | None) -> list[dict]:
    lm = NoEOS(load_model(backend=backend, threads=threads))
    rows = []
    for align in aligns:
        res = [smc_sample(lm, PROMPT, alpha=4.0, particles=particles, max_new_tokens=tokens,
                          resample_align=align, seed=s) for s in range(runs)]
        rows.append({
            "align": align,
            "var_log_z": statistics.variance(r.log_z for r in res),
            "mean_ess_fraction": statistics.fmean(statistics.fmean(r.ess) / particles
                                                  for r in res),
            "resamples": statistics.fmean(len(r.resample_steps) for r in res),
            "distinct_final": statistics.fmean(len({tuple(p.token_ids) for p in r.particles})
                                               for r in res)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _tables(toy_rows: list[dict], model_rows: list[dict], args: argparse.Namespace) -> str:
    lines = []
    if toy_rows:
        aligns = sorted({r["align"] for r in toy_rows})
        by = {(r["model"], r["N"], r["align"]): r for r in toy_rows}
        head = " | ".join(f"TV raw, B = {a}" for a in aligns)
        lines += [f"Toy LMs, {args.toy_runs} runs per cell, alpha = 4, ESS < N/2, systematic",
                  "", f"| toy LM | N | {head} | MC floor | var log Z_hat, B = "
                  f"{' / '.join(map(str, aligns))} | resamplings per run |",
                  "|---|---|" + "---|" * len(aligns) + "---|---|---|"]
        for m, n in dict.fromkeys((r["model"], r["N"]) for r in toy_rows):
            cells = [by[(m, n, a)] for a in aligns]
            lines.append(f"| {m} | {n} | " + " | ".join(f"{c['tv_raw']:.4f}" for c in cells)
                         + f" | {cells[0]['tv_floor']:.4f} | "
                         + " / ".join(f"{c['var_log_z']:.3f}" for c in cells) + " | "
                         + " / ".join(f"{c['resamples_per_run']:.2f}" for c in cells) + " |")
        lines.append("")
    if model_rows:
        lines += [f"N = {args.particles}, T = {args.tokens}, alpha = 4, {args.runs} runs per "
                  f"alignment, {args.backend}", "",
                  "| resample_align | var log Z_hat | mean ESS / N | resamples per run | "
                  "distinct final particles |", "|---|---|---|---|---|"]
        lines += [f"| {r['align']} | {r['var_log_z']:.3f} | {r['mean_ess_fraction']:.2f} | "
                  f"{r['resamples']:.1f} | {r['distinct_final']:.1f} |" for r in model_rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy-runs", type=int, default=4000, help="0: skip the toy part")
    ap.add_argument("--toy-particles", default="4,8,16,64")
    ap.add_argument("--toy-aligns", default="1,2,4,8")
    ap.add_argument("--aligns", default="1,8,32")
    ap.add_argument("--runs", type=int, default=40, help="0: skip the model part")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--backend", default="llama.cpp")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench-align")
    args = ap.parse_args()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    toy_rows = toy_part(args.toy_runs, ints(args.toy_particles), ints(args.toy_aligns)) \
        if args.toy_runs else []
    model_rows = model_part(ints(args.aligns), args.runs, args.tokens, args.particles,
                            args.backend, args.threads) if args.runs else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "resample_align.json").write_text(json.dumps(
        {"toy": toy_rows, "model": model_rows}, indent=1))
    table = _tables(toy_rows, model_rows, args)
    (out / "resample_align.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
