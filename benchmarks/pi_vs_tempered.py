"""How far pi_alpha and token-level tempering (tau = 1/alpha) are apart on few-shot task families.

Usage: python benchmarks/pi_vs_tempered.py [--prompts 16] [--smc-prompts 3] [--families a,b]
Writes docs/results/pi-vs-tempered/{results.json,README.md}. Default model, llama.cpp, 1 thread.
Families: today's 'builtin/*', the adopted 'builtin-multi/*' and the rejected candidates.

The few-shot prompts end with 'A:'; the model writes an answer line (' 55' then a newline) and
then goes on with the next 'Q:'. An *answer line* is the generated tokens up to and including
the first token holding a newline (or EOS); its graded answer is the first number in it.

* Exact, by teacher forcing over the tree of answer lines (every prefix with p >= --min-prob,
  so the lines left out each have p < min-prob): p(line), the tempered probability
  q(line) = prod_t softmax(alpha * log p_t)[y_t] (what low-temperature decoding draws; a
  prefix's probability under a token-level sampler does not depend on what follows), and
  pi_line(line) = p(line)^alpha / sum p^alpha over the lines (pi_alpha for a decode that stops
  at the newline; the left-out lines weigh at most min-prob^(alpha-1) of their mass).
* Estimated, for the eval's own target (generation runs on after the newline until
  --max-new-tokens): pi_T(answer) from Power-SMC's evidence-weighted particles,
  sum_r Z_hat_r sum_i W_r^i 1{answer_r^i = a} / sum_r Z_hat_r, which is consistent in the
  number of systems (`methods.selection`), over --smc-seeds x --smc-rounds systems of
  --particles particles.
Answers (lines grouped by graded answer) are compared by the gold answer's share under each
distribution and by the total variation between q and pi over answers (q's mass outside the
enumerated lines counts as one more answer).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

import powersmc
from powersmc.eval.builtin import FAMILIES, MULTI_FAMILIES, Family, few_shot, multi_problems
from powersmc.eval.grading import answer_key
from powersmc.methods.selection import normalized

OUT = Path("docs/results/pi-vs-tempered")
KIND = "first-number"
OTHER = "(not enumerated)"


# Candidates measured and rejected (docs/results/pi-vs-tempered): plain decoding almost never
# right, or pi_alpha and tempering nearly the same. The adopted ones are MULTI_FAMILIES.
def _add_nocarry(rng: random.Random) -> tuple[str, int]:
    a, c = rng.randint(1, 8), rng.randint(0, 9)
    b, d = rng.randint(1, 9 - a), rng.randint(0, 9 - c)
    return f"What is {10 * a + c} + {10 * b + d}?", 10 * (a + b) + c + d


def _add_3d(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a} + {b}?", a + b


def _sub_2d(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(50, 99), rng.randint(11, 49)
    return f"What is {a} - {b}?", a - b


def _sub_2d1d(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(20, 99), rng.randint(2, 9)
    return f"What is {a} - {b}?", a - b


def _mul_2d1d(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(12, 99), rng.randint(3, 9)
    return f"What is {a} * {b}?", a * b


def _mul_add(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} * {b} + {c}?", a * b + c


def _add_three(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} + {b} + {c}?", a + b + c


def _next_3d(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(100, 998)
    return f"What number comes after {a}?", a + 1


def _prev_3d(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(101, 999)
    return f"What number comes before {a}?", a - 1


def _max_3d(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(range(100, 999), 2)
    return f"Which is larger, {a} or {b}?", max(a, b)


def _times10(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(11, 99)
    return f"What is {a} * 10?", a * 10


def _series(rng: random.Random) -> tuple[str, int]:
    start, step = rng.randint(2, 40), rng.randint(3, 15)
    xs = [start + step * i for i in range(5)]
    return "What comes next: " + ", ".join(map(str, xs[:4])) + "?", xs[4]


CANDIDATES: dict[str, Family] = {
    **{f"builtin/{k}": f for k, f in FAMILIES.items()},
    **{f"builtin-multi/{k}": f for k, f in MULTI_FAMILIES.items()},
    "add-2d-nocarry": _add_nocarry, "add-3d": _add_3d, "sub-2d": _sub_2d, "sub-2d1d": _sub_2d1d,
    "mul-2d1d": _mul_2d1d, "mul-add": _mul_add, "add-three": _add_three, "next-3d": _next_3d,
    "prev-3d": _prev_3d, "max-3d": _max_3d, "times10": _times10, "series-any-step": _series,
}
SMC_FAMILIES = [k for k in CANDIDATES if k.startswith("builtin")]


def line_ends(lm) -> set[int]:
    """EOS ids and every token whose text holds a newline: where an answer line ends."""
    return set(lm.eos_token_ids) | {i for i in range(lm.vocab_size)
                                    if "\n" in lm.decode([i])}


def answer_lines(lm, ids: list[int], ends: set[int], alpha: float, min_prob: float,
                 max_tokens: int, width: int = 128) -> list[tuple[tuple[int, ...], float, float]]:
    """Every answer line with p >= min_prob as (tokens, log p, log q_tempered), by teacher
    forcing breadth-first (one batched step per depth); lines still open after max_tokens
    tokens are returned as they stand."""
    state, logp = lm.prefill(ids, 1, budget=width * (max_tokens + 1))
    frontier: list[tuple[tuple[int, ...], float, float]] = [((), 0.0, 0.0)]
    lines = []
    for _ in range(max_tokens):
        logq = torch.log_softmax(alpha * logp, dim=-1)
        grow = []
        for row, (toks, lp, lq) in enumerate(frontier):
            for v in torch.nonzero(logp[row] >= math.log(min_prob) - lp).flatten().tolist():
                child = (toks + (v,), lp + float(logp[row, v]), lq + float(logq[row, v]))
                (lines if v in ends else grow).append((row, child))
        if not grow:
            return [c for _, c in lines]
        grow = sorted(grow, key=lambda rc: -rc[1][1])[:width]
        lm.reorder(state, torch.tensor([row for row, _ in grow]))
        logp = lm.step(state, torch.tensor([c[0][-1] for _, c in grow]))
        frontier = [c for _, c in grow]
    return [c for _, c in lines] + frontier


def greedy_line(lm, ids: list[int], ends: set[int], max_tokens: int) -> str:
    state, logp = lm.prefill(ids, 1, budget=max_tokens + 1)
    toks = []
    for _ in range(max_tokens):
        toks.append(int(logp[0].argmax()))
        if toks[-1] in ends:
            break
        logp = lm.step(state, torch.tensor(toks[-1:]))
    return lm.decode(toks)


def by_answer(lm, lines, alpha: float) -> tuple[dict, dict, dict]:
    """Answer -> probability under p, tempered q and pi_line (lines grouped by graded answer)."""
    p: dict = {}
    q: dict = {}
    w: dict = {}
    top = max(lp for _, lp, _ in lines)
    for toks, lp, lq in lines:
        k = answer_key(lm.decode(toks), KIND)
        p[k] = p.get(k, 0.0) + math.exp(lp)
        q[k] = q.get(k, 0.0) + math.exp(lq)
        w[k] = w.get(k, 0.0) + math.exp(alpha * (lp - top))
    z = sum(w.values())
    q[OTHER] = max(0.0, 1.0 - sum(q.values()))
    return p, q, {k: v / z for k, v in w.items()}


def smc_shares(lm, text: str, alpha: float, particles: int, rounds: int, seeds: list[int],
               max_new_tokens: int) -> dict:
    """Answer -> evidence-weighted Power-SMC share: every system's particles weighted by
    Z_hat_r W_r^i (a call's particle weights are already Z_hat_r W_r^i / sum_s Z_hat_s, so
    calls are combined by their mean evidence exp(log_z))."""
    shares: dict = {}
    runs = [powersmc.smc_sample(lm, text, alpha=alpha, particles=particles, rounds=rounds,
                                max_new_tokens=max_new_tokens, seed=s) for s in seeds]
    top = max(r.log_z for r in runs)
    total = sum(math.exp(r.log_z - top) for r in runs)
    for r in runs:
        for part, w in zip(r.particles, normalized(r.particles), strict=True):
            k = answer_key(part.text, KIND)
            shares[k] = shares.get(k, 0.0) + w * math.exp(r.log_z - top) / total
    return shares


def _top(d: dict) -> str | None:
    return max((k for k in d if k != OTHER), key=d.get, default=None)


def family_prompts(name: str, args) -> list[tuple[str, int]]:
    """--prompts few-shot prompts of candidate `name`, seeded by --seed and the name."""
    rng = random.Random(f"{args.seed}:{name}")
    return [few_shot(rng, CANDIDATES[name]) for _ in range(args.prompts)]


def measure(lm, name: str, prompts: list[tuple[str, int]], args, ends: set[int]) -> list[dict]:
    rows = []
    for i, (text, gold) in enumerate(prompts):
        ids = lm.encode_prompt(text)
        start = time.perf_counter()
        p, q, pi = by_answer(lm, answer_lines(lm, ids, ends, args.alpha, args.min_prob,
                                              args.line_tokens), args.alpha)
        g = answer_key(f" {gold}", KIND)
        row = {"family": name, "question": text.splitlines()[-2][3:], "gold": str(gold),
               "greedy": answer_key(greedy_line(lm, ids, ends, args.line_tokens), KIND),
               "p_gold": p.get(g, 0.0), "q_gold": q.get(g, 0.0), "pi_gold": pi.get(g, 0.0),
               "p_covered": sum(p.values()), "top_q": _top(q), "top_pi": _top(pi),
               "q_top": q[_top(q)], "pi_top": pi[_top(pi)],
               "tv": 0.5 * sum(abs(q.get(k, 0.0) - pi.get(k, 0.0)) for k in set(q) | set(pi))}
        if i < args.smc_prompts and name in args.smc_families:
            s = smc_shares(lm, text, args.alpha, args.particles, args.smc_rounds,
                           args.smc_seeds, args.max_new_tokens)
            row |= {"pi_T_gold": s.get(g, 0.0), "top_pi_T": _top(s)}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summary(rows: list[dict]) -> dict:
    smc = [r for r in rows if "pi_T_gold" in r]
    return {
        "prompts": len(rows), "plain_p_gold": _mean([r["p_gold"] for r in rows]),
        "tempered_q_gold": _mean([r["q_gold"] for r in rows]),
        "pi_line_gold": _mean([r["pi_gold"] for r in rows]),
        "gap_gold": _mean([r["pi_gold"] - r["q_gold"] for r in rows]),
        "abs_gap_gold": _mean([abs(r["pi_gold"] - r["q_gold"]) for r in rows]),
        "tv": _mean([r["tv"] for r in rows]),
        "top_differs": sum(r["top_q"] != r["top_pi"] for r in rows) / len(rows),
        "greedy_not_top_pi": sum(r["greedy"] != r["top_pi"] for r in rows) / len(rows),
        "smc_prompts": len(smc), "pi_T_gold": _mean([r["pi_T_gold"] for r in smc]),
        "pi_line_gold_same_prompts": _mean([r["pi_gold"] for r in smc]),
        "q_gold_same_prompts": _mean([r["q_gold"] for r in smc]),
    }


def _f(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"


def markdown(summaries: dict[str, dict], rows: list[dict], args) -> str:
    head = (f"# pi_alpha vs tempered sampling (alpha = {args.alpha}, tau = 1/alpha), "
            "SmolLM2-135M-Instruct (GGUF), few-shot families\n\n"
            f"Command: `python benchmarks/pi_vs_tempered.py {args.argv}`\n\n"
            "Per family, means over its prompts. p, q, pi_line: exact over the answer lines "
            f"with p >= {args.min_prob} (teacher forcing); pi_T: Power-SMC evidence-weighted "
            f"estimate of the eval's target with max_new_tokens = {args.max_new_tokens} "
            f"({len(args.smc_seeds)} x {args.smc_rounds} systems of N = {args.particles}, on "
            f"the first {args.smc_prompts} prompts; q and pi_line on the same prompts beside "
            "it). TV: total variation between q and pi_line over answers. 'top differs': "
            "prompts whose most likely answer differs under q and pi_line; 'greedy != top pi': "
            "the greedy answer is not pi_alpha's (= p's) most likely answer. Families: "
            "'builtin/*' today's set, 'builtin-multi/*' the adopted ones, the rest rejected.\n\n")
    table = ["| family | prompts | p(gold) plain | q(gold) tempered | pi_line(gold) | "
             "pi - q gold | mean abs(pi - q) gold | TV(q, pi) | top differs | "
             "greedy != top pi | q / pi_line / pi_T gold (SMC prompts) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        table.append(
            f"| {name} | {s['prompts']} | {s['plain_p_gold']:.3f} | {s['tempered_q_gold']:.3f} "
            f"| {s['pi_line_gold']:.3f} | {s['gap_gold']:+.3f} | {s['abs_gap_gold']:.3f} | "
            f"{s['tv']:.3f} | {s['top_differs']:.0%} | {s['greedy_not_top_pi']:.0%} | "
            f"{_f(s['q_gold_same_prompts'])} / {_f(s['pi_line_gold_same_prompts'])} / "
            f"{_f(s['pi_T_gold'])} |")
    per = ["| family | question | gold | greedy | p(gold) | q(gold) | pi_line(gold) | pi_T(gold) "
           "| top q | top pi | TV |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pit = f"{r['pi_T_gold']:.3f}" if "pi_T_gold" in r else ""
        per.append(f"| {r['family']} | {r['question']} | {r['gold']} | {r['greedy']} | "
                   f"{r['p_gold']:.3f} | {r['q_gold']:.3f} | {r['pi_gold']:.3f} | {pit} | "
                   f"{r['top_q']} ({r['q_top']:.2f}) | {r['top_pi']} ({r['pi_top']:.2f}) | "
                   f"{r['tv']:.2f} |")
    return head + "\n".join(table) + "\n\n## Per prompt\n\n" + "\n".join(per) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(CANDIDATES))
    ap.add_argument("--prompts", type=int, default=16, help="prompts per family")
    ap.add_argument("--smc-prompts", type=int, default=3,
                    help="of those, how many get the pi_T estimate")
    ap.add_argument("--smc-families", default=",".join(SMC_FAMILIES),
                    help="families that get the pi_T estimate")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--min-prob", type=float, default=1e-3)
    ap.add_argument("--line-tokens", type=int, default=8, help="longest answer line enumerated")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="T of the pi_T estimate")
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--smc-rounds", type=int, default=8)
    ap.add_argument("--smc-seeds", default="0,1")
    ap.add_argument("--seed", type=int, default=1, help="prompt seed (not the eval's)")
    ap.add_argument("--eval-problems", type=int, default=0,
                    help="also the first N problems of builtin-multi, as the eval runs them")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    args.argv = " ".join(sys.argv[1:])
    args.smc_seeds = [int(s) for s in args.smc_seeds.split(",")]
    args.smc_families = args.smc_families.split(",")
    lm = powersmc.load_model(chat=False, threads=1)
    ends = line_ends(lm)
    groups = {name: family_prompts(name, args) for name in args.families.split(",") if name}
    if args.eval_problems:
        groups[f"eval: builtin-multi[:{args.eval_problems}]"] = [
            (p.question, int(p.answer)) for p in multi_problems()[: args.eval_problems]]
    rows, summaries = [], {}
    for name, prompts in groups.items():
        fam = measure(lm, name, prompts, args, ends)
        rows += fam
        summaries[name] = summary(fam)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items()}, "summary": summaries, "prompts": rows},
        indent=1))
    (out / "README.md").write_text(markdown(summaries, rows, args))


if __name__ == "__main__":
    main()
