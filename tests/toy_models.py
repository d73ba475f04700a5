"""Enumerable toy LMs shared by the exactness tests.

`trap_lm`: token-level temperature 1/alpha is clearly not pi_alpha. The first token is A
(p=0.4), after which the model is nearly certain, or B (p=0.6), after which it is uncertain.
Low temperature over-commits to B; the power target prefers the confident A branch.

`random_lm`: conditionals drawn from a fixed-seed Dirichlet-like hash of the prefix.
"""

from __future__ import annotations

import math
import random

from powersmc import FunctionLM

EOS = 0
A, B, C = 1, 2, 3
HORIZON = 4


def _trap(prefix: tuple[int, ...]) -> list[float]:
    gen = prefix[1:]  # prefix[0] is the prompt token
    if not gen:
        return [math.log(1e-3), math.log(0.4), math.log(0.6 - 1e-3), -math.inf]
    if gen[0] == A:  # confident branch: mostly A then EOS
        return [math.log(0.3), math.log(0.65), math.log(0.03), math.log(0.02)]
    return [math.log(0.25), math.log(0.25), math.log(0.25), math.log(0.25)]


def trap_lm() -> FunctionLM:
    return FunctionLM(_trap, vocab_size=4, eos_token_ids=[EOS])


def _random(prefix: tuple[int, ...]) -> list[float]:
    rng = random.Random(hash(prefix) ^ 0x5EED)
    return [math.log(rng.gammavariate(0.6, 1.0) + 1e-9) for _ in range(4)]


def random_lm() -> FunctionLM:
    return FunctionLM(_random, vocab_size=4, eos_token_ids=[EOS])


PROMPT = [3]


def row_limited(lm, max_rows: int) -> list[int]:
    """Give `lm` a row limit (as llama.cpp's 255 sequences) and record the rows of every
    forward it then serves (prefills, systems joining, steps: all rows of the batch at that
    moment); returns that (growing) list."""
    lm.max_rows = max_rows
    sizes: list[int] = []
    prefill, extend, step = lm.prefill_many, lm.extend, lm.step

    def counting_prefill(prompts, rows, **kw):
        state, logp = prefill(prompts, rows, **kw)
        sizes.append(len(state.prefixes))
        return state, logp

    def counting_extend(state, prompts, rows, **kw):
        out = extend(state, prompts, rows, **kw)
        sizes.append(len(state.prefixes))
        return out

    def counting_step(state, tokens):
        sizes.append(len(state.prefixes))
        return step(state, tokens)

    lm.prefill_many, lm.extend, lm.step = counting_prefill, counting_extend, counting_step
    return sizes
