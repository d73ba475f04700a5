"""Choosing 'builtin-long': worked answer families on which Power-SMC and tempering differ.

Usage: python benchmarks/long_family.py [--problems 48] [--tokens 48] [--particles 16]
       [--families chain-add,chain-mixed,times-split,sum4] [--threads 1] [--out DIR]

For each candidate of `eval.builtin.LONG_CANDIDATES` (few-shot, each answer worked out on one
line and ending 'The answer is N.'), `--problems` problems of that family alone, graded as the
last number of the first answer line, run through `run_eval` (resumable) with: plain decoding,
low-temperature decoding at tau = 1/alpha (token-level tempering) and Power-SMC (N particles,
alpha = 4, the drawn answer: pi_alpha over the whole T-token continuation). Reported per
family: accuracy of each, SMC minus low-temperature with McNemar's exact p, the share of
problems on which the two answers differ, and the answer line's length in tokens (mean over
SMC's answers).

The answer's law (`--law-problems` of those problems, every problem in one batch): the
tempered law q over graded answers from `--law-samples` low-temperature draws, twice (two
independent sets A and B), and pi_T from Power-SMC's evidence-weighted particles over
`--law-rounds` systems of N (`rounds`, consistent in the number of systems). Reported: the
mean over problems of TV(q_A, pi_T) and, as the Monte Carlo reference, of TV(q_A, q_B); and
the mean gold-answer share under each. A family is kept when its answers are long (>= 24
tokens), it is neither solved nor failed near always, and TV(q, pi_T) stands clearly above
the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from powersmc import load_model, smc_sample_many
from powersmc.eval.builtin import LONG_CANDIDATES, worked_problems
from powersmc.eval.grading import answer_key
from powersmc.eval.paired import mcnemar
from powersmc.eval.runner import run_eval
from powersmc.exact import total_variation
from powersmc.methods.decoding import decode_program
from powersmc.methods.selection import normalized
from powersmc.runtime.api import run_programs

METHODS = ["plain", "lowtemp", "smc"]


def line_tokens(lm, answer: str) -> int:
    """Tokens of the answer's first line, its newline included."""
    line = answer.split("\n", 1)[0] + "\n"
    return len(lm.encode_prompt("A:" + line)) - len(lm.encode_prompt("A:"))


def _law(texts: list[str], weights: list[float]) -> dict:
    law: dict = {}
    for text, w in zip(texts, weights, strict=True):
        k = answer_key(text, "line-last-number")
        law[k] = law.get(k, 0.0) + w
    total = sum(law.values())
    return {k: v / total for k, v in law.items()}


def answer_law(lm, problems: list, args: argparse.Namespace) -> dict:
    """TV(q_A, pi_T), TV(q_A, q_B) and gold shares, means over the problems."""
    prompts = [p.question for p in problems]
    draws = run_programs(lm, [decode_program(lm, text, temperature=0.25,
                                             num_samples=args.law_samples,
                                             max_new_tokens=args.tokens, seed=1000 * s + i)
                              for s in (1, 2) for i, text in enumerate(prompts)])
    smc = smc_sample_many(lm, prompts, alpha=4.0, particles=args.particles,
                          rounds=args.law_rounds, max_new_tokens=args.tokens, seed=3)
    n = len(problems)
    rows = []
    for i, p in enumerate(problems):
        qa = _law(draws[i].texts, [1.0] * args.law_samples)
        qb = _law(draws[n + i].texts, [1.0] * args.law_samples)
        pi = _law([q.text for q in smc[i].particles], normalized(smc[i].particles))
        gold = answer_key(p.answer, "line-last-number")
        rows.append({"tv_q_pi": total_variation(qa, pi), "tv_q_q": total_variation(qa, qb),
                     "gold_q": qa.get(gold, 0.0), "gold_pi": pi.get(gold, 0.0)})
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def measure(lm, name: str, args: argparse.Namespace) -> dict:
    problems = worked_problems(args.problems, args.seed, {name: LONG_CANDIDATES[name]},
                               "cand", "line-last-number")
    law = answer_law(lm, problems[: args.law_problems], args) if args.law_problems else {}
    rows = run_eval(lm, problems, methods=METHODS, seeds=[0], out_dir=Path(args.out) / name,
                    template="{problem}", alpha=4.0, max_new_tokens=args.tokens,
                    options={"particles": args.particles}, batch_prompts=args.batch_prompts,
                    progress=False)
    by = {(r["problem_id"], r["method"]): r for r in rows}
    ids = [p.id for p in problems]
    acc = {m: statistics.fmean(by[(i, m)]["correct"] for i in ids) for m in METHODS}
    smc = [by[(i, "smc")]["correct"] for i in ids]
    low = [by[(i, "lowtemp")]["correct"] for i in ids]
    return {"family": name, "problems": len(ids), **{f"acc_{m}": acc[m] for m in METHODS},
            "smc_minus_lowtemp": acc["smc"] - acc["lowtemp"],
            "mcnemar_p": mcnemar(smc, low)["p_value"],
            "answers_differ": statistics.fmean(
                by[(i, "smc")]["extracted"] != by[(i, "lowtemp")]["extracted"] for i in ids),
            "line_tokens": statistics.fmean(line_tokens(lm, by[(i, "smc")]["answer"])
                                            for i in ids), **law}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(LONG_CANDIDATES))
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--law-problems", type=int, default=6, help="0: skip the answer's law")
    ap.add_argument("--law-samples", type=int, default=48)
    ap.add_argument("--law-rounds", type=int, default=4)
    ap.add_argument("--backend", default="llama.cpp")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench-out/long-family")
    args = ap.parse_args()
    lm = load_model(backend=args.backend, threads=args.threads, chat=False)
    found = []
    for name in args.families.split(","):
        found.append(measure(lm, name, args))
        print(json.dumps(found[-1]), flush=True)
    lines = [f"{args.problems} problems per family, T = {args.tokens}, alpha = 4, "
             f"N = {args.particles}, {args.backend}", "",
             "| family | answer line (tokens) | plain | lowtemp | smc | smc - lowtemp | "
             "McNemar p | answers differ | TV(q, pi_T) | TV(q, q') | gold: q / pi_T |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['line_tokens']:.1f} | {r['acc_plain']:.3f} | "
              f"{r['acc_lowtemp']:.3f} | {r['acc_smc']:.3f} | {r['smc_minus_lowtemp']:+.3f} | "
              f"{r['mcnemar_p']:.3g} | {r['answers_differ']:.2f} | "
              + (f"{r['tv_q_pi']:.3f} | {r['tv_q_q']:.3f} | {r['gold_q']:.3f} / "
                 f"{r['gold_pi']:.3f} |" if "tv_q_pi" in r else "- | - | - |") for r in found]
    out = Path(args.out)
    (out / "long_family.json").write_text(json.dumps({"argv": vars(args), "rows": found},
                                                     indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
