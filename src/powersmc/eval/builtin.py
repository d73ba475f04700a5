"""A built-in task set for quick side-by-side runs on small models, generated deterministically.

Few-shot, answer-first arithmetic questions (a 135M model cannot follow a boxed-answer
instruction reliably, but completes a few-shot pattern). Each prompt carries four solved
examples and ends with 'A:'; the answer is graded exactly as the first number the model
writes ('first-number' grading). Families and sizes were chosen so that plain decoding of
SmolLM2-135M-Instruct lands between 15% and 70% (see docs/results/).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from powersmc.eval.problem import Problem

Family = Callable[[random.Random], tuple[str, int]]

SIZE = 120
SEED = 20260


def _add(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} + {b}?", a + b


def _sub(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 19), rng.randint(2, 9)
    return f"What is {a} - {b}?", a - b


def _next(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(11, 97)
    return f"What number comes after {a}?", a + 1


def _max(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(range(11, 99), 2)
    return f"Which is larger, {a} or {b}?", max(a, b)


FAMILIES: dict[str, Family] = {"add": _add, "sub": _sub, "next": _next, "max": _max}


def few_shot(rng: random.Random, family: Family) -> tuple[str, int]:
    """A prompt of four solved examples of `family` and one question ending in 'A:', and the
    question's answer."""
    shots = [family(rng) for _ in range(4)]
    q, a = family(rng)
    lines = [f"Q: {sq}\nA: {sa}" for sq, sa in shots]
    return "\n".join(lines) + f"\nQ: {q}\nA:", a


def builtin_problems(size: int = SIZE, seed: int = SEED) -> list[Problem]:
    """`size` problems, cycling through the families; the same list on every machine."""
    rng = random.Random(seed)
    names = list(FAMILIES)
    out = []
    for i in range(size):
        name = names[i % len(names)]
        text, answer = few_shot(rng, FAMILIES[name])
        out.append(Problem(f"builtin-{i:03d}-{name}", text, str(answer), "first-number",
                           {"subject": name}))
    return out
