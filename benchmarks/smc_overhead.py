"""Power-SMC wall-clock divided by plain batched sampling of the same N sequences, side by side.

Usage: python benchmarks/smc_overhead.py [--particles 16] [--tokens 64] [--repeats 7]
Both sides decode exactly T tokens (EOS disabled); rounds alternate the two sides; the median
and quartiles of the per-round ratio are printed. Target: <= 1.05.
"""

from __future__ import annotations

import argparse

from powersmc import load_model
from powersmc.bench import smc_overhead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--ess-threshold", type=float, default=0.5)
    args = ap.parse_args()
    lm = load_model(device="auto")
    res = smc_overhead(lm, "Explain why the sky is blue.", particles=args.particles,
                       tokens=args.tokens, alpha=args.alpha, repeats=args.repeats,
                       ess_threshold=args.ess_threshold)
    o, r = res["overhead"], res["relative_latency"]
    print(f"device={lm.device} N={args.particles} T={args.tokens} kappa={args.ess_threshold}")
    print(f"SMC / batched sampling: median {o['median']:.3f} (IQR {o['q1']:.3f}-{o['q3']:.3f}, "
          f"min {o['min']:.3f}, max {o['max']:.3f}, n={o['n']}); "
          f"{res['resamples_per_run']:.1f} resamples per run")
    print(f"SMC / batch-1 decoding: median {r['median']:.2f}x")


if __name__ == "__main__":
    main()
