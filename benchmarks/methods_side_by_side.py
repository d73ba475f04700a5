"""Every method on one fixed prompt, side by side in one process: wall-clock and token-evals.

Usage: python benchmarks/methods_side_by_side.py [--max-new-tokens 64] [--alpha 4]
Prints a Markdown table; latency is relative to plain decoding measured in the same run.
"""

from __future__ import annotations

import argparse

from powersmc import load_model
from powersmc.runtime.api import run_method

PROMPT = "What is 15 + 27? Explain briefly."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lm = load_model(device="auto")
    opts = {"particles": 16, "num_blocks": 4, "mh_moves": 10, "candidates": 8, "rollouts": 8,
            "horizon": 16}
    rows = []
    for method in ("plain", "lowtemp", "smc", "mh", "mh-faithful", "spower"):
        r = run_method(method, lm, PROMPT, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, **opts)
        rows.append((method, r))
    base = rows[0][1].cost.seconds
    print(f"prompt: {PROMPT!r}; alpha={args.alpha}; max_new_tokens={args.max_new_tokens}; "
          f"device={lm.device}; options={opts}\n")
    print("| method | seconds | rel. to plain | tokens | token evals | forward passes |")
    print("|---|---|---|---|---|---|")
    for method, r in rows:
        c = r.cost
        print(f"| {method} | {c.seconds:.2f} | {c.seconds / base:.2f}× | {len(r.token_ids)} | "
              f"{c.token_evals} | {c.forward_passes} |")


if __name__ == "__main__":
    main()
