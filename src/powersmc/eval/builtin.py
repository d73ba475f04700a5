"""Built-in task sets for quick side-by-side runs on small models, generated deterministically.

Few-shot, answer-first arithmetic questions (a 135M model cannot follow a boxed-answer
instruction reliably, but completes a few-shot pattern). Each prompt carries four solved
examples and ends with 'A:'; the answer is graded exactly as the first number the model
writes ('first-number' grading).

* 'builtin' (FAMILIES, 120 problems): one- or two-digit answers on which plain decoding of
  SmolLM2-135M-Instruct lands between 15% and 70% (docs/results/builtin). There pi_alpha and
  token-level tempering at tau = 1/alpha nearly coincide.
* 'builtin-multi' (MULTI_FAMILIES, 1000 problems): answers of two or three digits, written
  one token per digit, on which the model's most likely first digit often does not lead to
  its most likely whole answer, so pi_alpha and tempering differ. Chosen by measuring both
  exactly with the model (benchmarks/pi_vs_tempered.py, docs/results/pi-vs-tempered), among
  candidates that were either solved or failed near always, or where the two coincide.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from powersmc.eval.problem import Problem

Family = Callable[[random.Random], tuple[str, int]]

SIZE = 120
SEED = 20260
MULTI_SIZE = 1000
MULTI_SEED = 20261


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


def _add_2d(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(15, 89), rng.randint(15, 89)
    return f"What is {a} + {b}?", a + b


def _add_2d1d(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 89), rng.randint(2, 9)
    return f"What is {a} + {b}?", a + b


def _add_tens(rng: random.Random) -> tuple[str, int]:
    a, b = 10 * rng.randint(1, 8), rng.randint(11, 89)
    return f"What is {a} + {b}?", a + b


def _double(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(11, 49)
    return f"What is {a} + {a}?", 2 * a


def _count_by(rng: random.Random) -> tuple[str, int]:
    start, step = rng.randint(10, 90), rng.choice([2, 5, 10])
    xs = [start + step * i for i in range(5)]
    return "What comes next: " + ", ".join(map(str, xs[:4])) + "?", xs[4]


MULTI_FAMILIES: dict[str, Family] = {"add-2d": _add_2d, "add-2d1d": _add_2d1d,
                                     "add-tens": _add_tens, "double": _double,
                                     "count-by": _count_by}


def few_shot(rng: random.Random, family: Family) -> tuple[str, int]:
    """A prompt of four solved examples of `family` and one question ending in 'A:', and the
    question's answer."""
    examples = [family(rng) for _ in range(4)]
    q, a = family(rng)
    lines = [f"Q: {sq}\nA: {sa}" for sq, sa in examples]
    return "\n".join(lines) + f"\nQ: {q}\nA:", a


def builtin_problems(size: int = SIZE, seed: int = SEED, families: dict[str, Family] = FAMILIES,
                     prefix: str = "builtin") -> list[Problem]:
    """`size` problems, cycling through the families; the same list on every machine.
    Ids are '<prefix>-<index>-<family>', the index zero-padded to at least three digits."""
    rng = random.Random(seed)
    names = list(families)
    width = max(3, len(str(size - 1)))
    out = []
    for i in range(size):
        name = names[i % len(names)]
        text, answer = few_shot(rng, families[name])
        out.append(Problem(f"{prefix}-{i:0{width}d}-{name}", text, str(answer), "first-number",
                           {"subject": name}))
    return out


def multi_problems(size: int = MULTI_SIZE, seed: int = MULTI_SEED) -> list[Problem]:
    """The 'builtin-multi' set: `size` problems of MULTI_FAMILIES, ids 'multi-000-add-2d'."""
    return builtin_problems(size, seed, MULTI_FAMILIES, "multi")


BUILTIN_SETS = {"builtin": builtin_problems, "builtin-multi": multi_problems}
