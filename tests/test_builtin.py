"""The built-in task sets: deterministic, correct answers, graded as the model writes them, and
today's 'builtin' list unchanged (so committed runs still resume)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from powersmc.eval.builtin import (
    LONG_FAMILIES,
    MULTI_FAMILIES,
    builtin_problems,
    long_problems,
    multi_problems,
)
from powersmc.eval.data import load_problems
from powersmc.eval.grading import answer_key, grade

RUN = Path(__file__).resolve().parents[1] / "docs" / "results" / "builtin"


def _solve(question: str) -> int:
    """The answer of a built-in question, worked out from its text alone."""
    if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question):
        a, op, b = int(m[1]), m[2], int(m[3])
        return a + b if op == "+" else a - b
    if m := re.fullmatch(r"What comes next: (\d+), (\d+), (\d+), (\d+)\?", question):
        xs = [int(x) for x in m.groups()]
        steps = {b - a for a, b in zip(xs, xs[1:], strict=False)}
        assert len(steps) == 1, question
        return xs[-1] + steps.pop()
    if m := re.fullmatch(r"What number comes after (\d+)\?", question):
        return int(m[1]) + 1
    if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", question):
        return max(int(m[1]), int(m[2]))
    raise AssertionError(f"unknown question: {question}")


def _pairs(prompt: str) -> list[tuple[str, str]]:
    return re.findall(r"Q: (.*)\nA:(.*)", prompt)


def test_builtin_is_the_list_committed_runs_used():
    """Ids and references of the committed 'builtin' run are those builtin_problems makes."""
    config = json.loads((RUN / "config.json").read_text())
    problems = {p.id: p for p in builtin_problems()}
    assert config["problems"] == list(problems)[: len(config["problems"])]
    with (RUN / "results.jsonl").open() as fh:
        for line in fh:
            row = json.loads(line)
            assert problems[row["problem_id"]].answer == row["reference"]


def test_multi_is_deterministic_balanced_and_multi_digit():
    a, b = multi_problems(), multi_problems()
    assert [(p.id, p.question, p.answer) for p in a] == [(p.id, p.question, p.answer) for p in b]
    assert len(a) == 1000 and len({p.id for p in a}) == 1000
    assert a[0].id == "multi-000-add-2d" and a[-1].id == "multi-999-count-by"
    assert Counter(p.meta["subject"] for p in a) == {name: 200 for name in MULTI_FAMILIES}
    assert all(p.kind == "first-number" and len(p.answer) in (2, 3) for p in a)
    assert not {p.question for p in a} & {p.question for p in builtin_problems()}


@pytest.mark.parametrize("make", [builtin_problems, multi_problems])
def test_every_answer_and_every_example_is_right(make):
    """The reference and the four solved examples of each prompt, checked from the text."""
    for p in make():
        pairs = _pairs(p.question)
        assert len(pairs) == 5 and p.question.endswith("\nA:")
        for q, a in pairs[:-1]:
            assert int(a) == _solve(q), p.id
        assert int(p.answer) == _solve(pairs[-1][0]) and pairs[-1][1] == "", p.id


def test_multi_loads_by_name_and_subsets_by_family():
    doubles = load_problems("builtin-multi", subset="subject=double")
    assert len(doubles) == 200 and {p.meta["subject"] for p in doubles} == {"double"}
    assert [p.id for p in load_problems("builtin-multi", limit=5)] == [
        p.id for p in multi_problems()[:5]]


@pytest.mark.parametrize(("text", "correct"), [
    (" 124\nQ: What is", True),          # the answer line, then the model's next question
    (" 124.\n", True),
    (" 12\nQ: What is 124", False),      # only the first number counts
    (" 142\n", False),
    ("\nQ: What", False),                # no number at all
])
def test_multi_digit_answers_are_graded_on_the_first_number(text, correct):
    assert grade(text, "124", "first-number").correct is correct


def test_vote_pools_the_same_multi_digit_answer():
    keys = {answer_key(t, "first-number") for t in (" 124\nQ:", " 124.\nQ: What", "124 ")}
    assert keys == {answer_key("124", "first-number")}
    assert answer_key(" 12\n4", "first-number") != answer_key(" 124", "first-number")


def _worked(question: str, shown: str) -> int:
    """Check every step of a worked answer and return its result (the question's value)."""
    if m := re.fullmatch(r"What is (\d+) times (\d+)\?", question):
        value = int(m[1]) * int(m[2])
        for k, x, y in re.findall(r"(\d+) times (\d+) is (\d+)", shown):
            assert int(k) * int(x) == int(y) and k == m[1], shown
    else:
        m = re.fullmatch(r"What is (\d+(?: [+-] \d+)+)\?", question)
        assert m, question
        value = eval(m[1])  # noqa: S307 - digits, + and - only (matched above)
    for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", shown):
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), shown
    assert shown.endswith(f"The answer is {value}."), shown
    return value


def test_long_is_deterministic_worked_and_right():
    """'builtin-long': the same list twice, balanced, every example's steps and result and
    every reference checked from the text."""
    a, b = long_problems(), long_problems()
    assert [(p.id, p.question, p.answer) for p in a] == [(p.id, p.question, p.answer) for p in b]
    assert len(a) == 1000 and len({p.id for p in a}) == 1000
    counts = Counter(p.meta["subject"] for p in a)
    assert set(counts) == set(LONG_FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    for p in a:
        pairs = _pairs(p.question)
        assert len(pairs) == 5 and p.question.endswith("\nA:") and p.kind == "line-last-number"
        for q, shown in pairs[:-1]:
            _worked(q, shown.strip())
        assert pairs[-1][1] == ""
        q = pairs[-1][0]
        value = int(q.split()[2]) * int(q.split()[4][:-1]) if "times" in q else eval(  # noqa: S307
            q.removeprefix("What is ").removesuffix("?"))
        assert int(p.answer) == value, p.id
    assert load_problems("builtin-long", limit=3) == a[:3]


@pytest.mark.parametrize(("text", "correct"), [
    (" 23 + 45 = 68, 68 + 17 = 85. The answer is 85.\nQ: What is 12", True),
    (" 23 + 45 = 68, 68 + 17 = 85.\n", True),        # the result is the line's last number
    (" 23 + 45 = 68, 68 + 17 = 86. The answer is 86.\nQ: 85", False),
    ("\n 85\nQ:", True),                              # a leading newline is not the line
    (" The answer is\n85", False),                     # no number on the first line
])
def test_worked_answers_are_graded_on_the_first_lines_last_number(text, correct):
    assert grade(text, "85", "line-last-number").correct is correct
    assert (answer_key(text, "line-last-number") == answer_key("85", "line-last-number")) \
        is correct
