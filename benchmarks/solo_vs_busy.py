"""How often a seeded Power-SMC answer's text differs between a solo run and a busy batch on a
real backend (issue 19): the scheduler gives every system its own generator, so the answer can
differ only where the batched forward pass differs from a solo one in its last float bits.

Usage: python benchmarks/solo_vs_busy.py [--seeds 50] [--particles 8] [--tokens 48]
       [--backend llama.cpp] [--cache static] [--threads 2]
(On Transformers pass `--cache static`: on the dynamic cache a system joins only an empty
batch, so it would run alone both times.)
For each seed: the system alone in a scheduler, then the same system joining a batch already
running three other systems (other prompts, alphas, particle counts). Printed: how many of the
seeds gave the same text, the same token ids, and the same log Z estimate bit for bit.
"""

from __future__ import annotations

import argparse

from powersmc import Scheduler, load_model

PROMPT = "What is 15 + 27? Answer with the number."
OTHERS = [("Name a prime number.", 2.0, 4), ("Explain why the sky is blue.", 4.0, 12),
          ("Write one sentence about the sea.", 3.0, 6)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cache", default=None, help="Transformers' KV cache (static, dynamic)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    extra = {} if args.cache is None else {"cache": args.cache}
    lm = load_model(backend=args.backend, threads=args.threads, **extra)
    kw = dict(alpha=4.0, particles=args.particles, max_new_tokens=args.tokens)
    same_text = same_ids = same_z = 0
    for seed in range(args.seeds):
        solo = Scheduler(lm)
        h = solo.submit(PROMPT, seed=seed, **kw)
        solo.run()
        alone = h.result()
        busy = Scheduler(lm)
        for k, (prompt, alpha, n) in enumerate(OTHERS):
            busy.submit(prompt, seed=10_000 + 3 * seed + k, alpha=alpha, particles=n,
                        max_new_tokens=args.tokens)
        busy.step()  # the seeded system joins a batch that is already running
        busy.step()
        h = busy.submit(PROMPT, seed=seed, **kw)
        busy.run()
        mixed = h.result()
        same_text += mixed.text == alone.text
        same_ids += mixed.token_ids == alone.token_ids
        same_z += mixed.log_z == alone.log_z
    name = getattr(lm, "name", type(lm).__name__)
    print(f"{name}, N={args.particles}, T={args.tokens}, {args.seeds} seeds: same text "
          f"{same_text}/{args.seeds}, same token ids {same_ids}/{args.seeds}, same log Z "
          f"{same_z}/{args.seeds}")


if __name__ == "__main__":
    main()
