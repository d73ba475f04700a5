"""The `Problem` record shared by every data source (a leaf module: it imports nothing of ours,
so `data` and `builtin` can both depend on it without depending on each other)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One problem: `kind` is 'math' (boxed answer, MATH grading), 'number' (GSM8K-style),
    'first-number' (the answer-first built-in sets) or 'line-last-number' ('builtin-long')."""

    id: str
    question: str
    answer: str
    kind: str
    meta: dict = field(default_factory=dict)
