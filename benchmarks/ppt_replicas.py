"""PPT's replicas are rows of one batch: K = 4 rungs against one chain, in forward passes.

Usage: python benchmarks/ppt_replicas.py [--prompts 4] [--max-new-tokens 64]
       [--stage-tokens 32] [--moves 4] [--threads 2]

On the first --prompts GSM8K test questions, each run alone on a fresh `Scheduler`: PPT with
the default ladder (4 rungs from 1 + (alpha-1)/2 to alpha = 4) and PPT with one rung at
alpha, same seed, stages and moves. Forward passes are the scheduler's steps each run took
part in; token-evals count every row. Prints one JSON document (per prompt and the ratio of
the totals).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from powersmc import load_model
from powersmc.methods.ppt import default_ladder, ppt_program
from powersmc.runtime.api import run_program

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
ALPHA = 4.0


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--stage-tokens", type=int, default=32)
    ap.add_argument("--moves", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    lm = load_model(threads=args.threads)
    with open(DATA) as fh:
        prompts = [json.loads(line)["question"] for line, _ in zip(fh, range(args.prompts),
                                                                   strict=False)]
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict = {"prompt": i}
        for name, ladder in (("k4", default_ladder(ALPHA)), ("k1", [ALPHA])):
            start = time.perf_counter()
            r = run_program(lm, ppt_program(lm, prompt, max_new_tokens=args.max_new_tokens,
                                            alphas=ladder, stage_tokens=args.stage_tokens,
                                            mh_moves=args.moves, seed=i))
            row[name] = {"forward_passes": r.cost.forward_passes,
                         "token_evals": r.cost.token_evals,
                         "seconds": round(time.perf_counter() - start, 2),
                         "swap_acceptance": r.stats["swap_acceptance"],
                         "move_acceptance": r.stats["move_acceptance"]}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    total = {k: sum(r[k]["forward_passes"] for r in rows) for k in ("k4", "k1")}
    secs = {k: sum(r[k]["seconds"] for r in rows) for k in ("k4", "k1")}
    print(json.dumps({"settings": vars(args), "ladder": list(default_ladder(ALPHA)),
                      "runs": rows, "forward_passes": total,
                      "forward_pass_ratio": round(total["k4"] / total["k1"], 3),
                      "seconds": secs, "seconds_ratio": round(secs["k4"] / secs["k1"], 3)},
                     indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
