"""Several prompts in one batch: P prompts x N particles (`smc_sample_many`) against the same P
prompts run one after another (`smc_sample`), side by side in one run.

Usage: python benchmarks/multi_prompt.py [--particles 16] [--tokens 64] [--prompts 2,4]
       [--repeats 3]
Both sides decode exactly T tokens (EOS disabled) with the same seeds; rounds alternate. Printed
per P: the median throughput gain t(sequential) / t(batched) and its IQR, next to the gain
Lemma 1 predicts from measured decode steps, s(P*N) / s(N).
"""

from __future__ import annotations

import argparse

from powersmc import load_model
from powersmc.bench import OTHER_PROMPTS, batch_throughput, multi_prompt_gain

PROMPT = "Explain why the sky is blue."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", default="2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=4.0)
    args = ap.parse_args()
    sizes = [int(p) for p in args.prompts.split(",")]
    if not sizes or min(sizes) < 1 or max(sizes) > 1 + len(OTHER_PROMPTS):
        ap.error(f"--prompts: comma-separated counts from 1 to {1 + len(OTHER_PROMPTS)}")
    lm = load_model(device="auto")
    n = args.particles
    s = batch_throughput(lm, lm.encode_prompt(PROMPT), sorted({1, n, *(p * n for p in sizes)}))
    print(f"device={lm.device} N={n} T={args.tokens} alpha={args.alpha}")
    for p in sizes:
        m = multi_prompt_gain(lm, [PROMPT, *OTHER_PROMPTS][:p], particles=n, tokens=args.tokens,
                              alpha=args.alpha, repeats=args.repeats)
        g = m["gain"]
        print(f"P={p}: gain median {g['median']:.2f}x (IQR {g['q1']:.2f}-{g['q3']:.2f}); "
              f"sequential {m['sequential_seconds']:.2f}s, batched {m['batched_seconds']:.2f}s; "
              f"predicted s(PN)/s(N) = {s[p * n] / s[n]:.2f}x")


if __name__ == "__main__":
    main()
