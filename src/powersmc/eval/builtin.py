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
* 'builtin-long' (LONG_FAMILIES, 1000 problems): sums worked out step by step on one line
  ('29 + 3 = 32, 32 + 6 = 38. The answer is 38.'), about 33 tokens, graded as the last number
  of the answer's first line ('line-last-number'). Chosen by measuring Power-SMC against
  low-temperature decoding on seven candidates (benchmarks/long_family.py,
  docs/results/long-family): the kept three are solved 20-60% of the time and their answer
  laws under pi_alpha and tempering differ well beyond Monte Carlo error; the other four
  (three-term sums and differences of two-digit numbers, products split by tens, four-term
  sums) were failed near always.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from powersmc.eval.problem import Problem

Family = Callable[[random.Random], tuple[str, int]]
Worked = Callable[[random.Random], tuple[str, str, int]]  # question, worked answer, result

SIZE = 120
SEED = 20260
MULTI_SIZE = 1000
MULTI_SEED = 20261
LONG_SIZE = 1000
LONG_SEED = 20262


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


def _sum(*xs: int) -> tuple[str, str, int]:
    """A sum asked for and worked out as a running total: 'a + b = s, s + c = t. The answer
    is t.'"""
    run = [sum(xs[: i + 1]) for i in range(len(xs))]
    steps = [f"{xs[0]} + {xs[1]} = {run[1]}"] + [
        f"{run[i - 1]} + {xs[i]} = {run[i]}" for i in range(2, len(xs))]
    return (f"What is {' + '.join(map(str, xs))}?",
            ", ".join(steps) + f". The answer is {run[-1]}.", run[-1])


def _chain_add(rng: random.Random) -> tuple[str, str, int]:
    return _sum(*(rng.randint(11, 49) for _ in range(3)))


def _chain_mixed(rng: random.Random) -> tuple[str, str, int]:
    a, b, c = rng.randint(50, 89), rng.randint(11, 39), rng.randint(11, 39)
    return (f"What is {a} - {b} + {c}?",
            f"{a} - {b} = {a - b}, {a - b} + {c} = {a - b + c}. The answer is {a - b + c}.",
            a - b + c)


def _times_split(rng: random.Random) -> tuple[str, str, int]:
    k, n = rng.randint(3, 9), rng.randint(12, 49)
    tens, ones = n - n % 10, n % 10
    return (f"What is {k} times {n}?",
            f"{k} times {tens} is {k * tens}, {k} times {ones} is {k * ones}, "
            f"{k * tens} + {k * ones} = {k * n}. The answer is {k * n}.", k * n)


def _sum4(rng: random.Random) -> tuple[str, str, int]:
    return _sum(*(rng.randint(11, 29) for _ in range(4)))


def _add_small3(rng: random.Random) -> tuple[str, str, int]:
    return _sum(rng.randint(12, 79), rng.randint(2, 9), rng.randint(2, 9))


def _add_thrice(rng: random.Random) -> tuple[str, str, int]:
    a, k = rng.randint(12, 69), rng.randint(2, 9)
    return _sum(a, k, k, k)


def _double_twice(rng: random.Random) -> tuple[str, str, int]:
    a = rng.randint(11, 24)
    return _sum(a, a, 2 * a)


LONG_CANDIDATES: dict[str, Worked] = {"chain-add": _chain_add, "chain-mixed": _chain_mixed,
                                      "times-split": _times_split, "sum4": _sum4,
                                      "add-small3": _add_small3, "add-thrice": _add_thrice,
                                      "double-twice": _double_twice}
LONG_FAMILIES: dict[str, Worked] = {k: LONG_CANDIDATES[k]
                                    for k in ("add-small3", "add-thrice", "double-twice")}


def _answer_first(family: Family) -> Worked:
    def worked(rng: random.Random) -> tuple[str, str, int]:
        q, a = family(rng)
        return q, str(a), a
    return worked


def few_shot(rng: random.Random, family: Worked) -> tuple[str, int]:
    """A prompt of four solved examples of `family` and one question ending in 'A:', and the
    question's answer."""
    examples = [family(rng) for _ in range(4)]
    q, _, a = family(rng)
    lines = [f"Q: {sq}\nA: {shown}" for sq, shown, _ in examples]
    return "\n".join(lines) + f"\nQ: {q}\nA:", a


def worked_problems(size: int, seed: int, families: dict[str, Worked], prefix: str,
                    kind: str) -> list[Problem]:
    """`size` problems, cycling through the families; the same list on every machine.
    Ids are '<prefix>-<index>-<family>', the index zero-padded to at least three digits."""
    rng = random.Random(seed)
    names = list(families)
    width = max(3, len(str(size - 1)))
    out = []
    for i in range(size):
        name = names[i % len(names)]
        text, answer = few_shot(rng, families[name])
        out.append(Problem(f"{prefix}-{i:0{width}d}-{name}", text, str(answer), kind,
                           {"subject": name}))
    return out


def builtin_problems(size: int = SIZE, seed: int = SEED, families: dict[str, Family] = FAMILIES,
                     prefix: str = "builtin") -> list[Problem]:
    """The answer-first sets ('first-number' grading): `size` problems of `families`."""
    return worked_problems(size, seed, {k: _answer_first(f) for k, f in families.items()},
                           prefix, "first-number")


def multi_problems(size: int = MULTI_SIZE, seed: int = MULTI_SEED) -> list[Problem]:
    """The 'builtin-multi' set: `size` problems of MULTI_FAMILIES, ids 'multi-000-add-2d'."""
    return builtin_problems(size, seed, MULTI_FAMILIES, "multi")


def long_problems(size: int = LONG_SIZE, seed: int = LONG_SEED) -> list[Problem]:
    """The 'builtin-long' set: `size` worked problems of LONG_FAMILIES, ids
    'long-000-chain-add', graded as the last number of the answer's first line."""
    return worked_problems(size, seed, LONG_FAMILIES, "long", "line-last-number")


BUILTIN_SETS = {"builtin": builtin_problems, "builtin-multi": multi_problems,
                "builtin-long": long_problems}
