"""Answer grading in the style of the MATH / PRM800K graders, plus a math-verify cross-check.

MATH: the last brace-matched \\boxed{...} (or \\fbox{...}) of the answer, normalized following the
MATH / PRM800K conventions, equal to the reference as a normalized string or by sympy
equivalence (under a time limit). No box means wrong.
GSM8K: the number after '####' in the reference (commas removed) against the last number in the
answer's last box, or else in the answer.
Grading never raises: an exception grades as wrong and is reported in `GradeResult.error`.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from dataclasses import dataclass

SYMPY_TIMEOUT_S = 5.0


@dataclass
class GradeResult:
    extracted: str | None
    correct: bool
    correct_math_verify: bool | None
    error: str | None = None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} with matched braces (or '\\boxed x')."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    head = text[idx:].split("{", 1)[0]
    if head.startswith("\\boxed ") and (i < 0 or text[idx + 7 : i].strip()):
        return text[idx + 7 :].split("$")[0].strip() or None
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}."""
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub.startswith("{") or len(sub) < 2:
            out += sub
            continue
        a, b, rest = sub[0], sub[1], sub[2:]
        out += "{" + a + "}" + ("{" + b + "}" + rest if b != "{" else b + rest)
    return out


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize(answer: str) -> str:
    """MATH / PRM800K-style string normalization of a final answer."""
    s = answer.strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "").replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s).strip()  # trailing units
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{(.*?)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if re.fullmatch(r"[a-zA-Z]\s*=.*", s) and len(s.split("=")) == 2:
        s = s.split("=", 1)[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError after `seconds` (main thread on Unix; otherwise no limit)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise TimeoutError("sympy comparison timed out")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sympy_equal(a: str, b: str, timeout: float = SYMPY_TIMEOUT_S) -> bool:
    """Whether two normalized LaTeX answers are equal as sympy expressions."""
    import sympy
    from latex2sympy2_extended import latex2sympy

    with time_limit(timeout):
        x, y = latex2sympy(a), latex2sympy(b)
        if isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr):
            return bool(sympy.simplify(x - y) == 0)
        return bool(x == y)


def math_equal(pred: str, ref: str) -> bool:
    """Normalized string equality, else sympy equivalence."""
    a, b = normalize(pred), normalize(ref)
    if a == b:
        return True
    try:
        return sympy_equal(a, b)
    except Exception:  # unparsable or timed out: not equal
        return False


def math_verify_equal(pred_text: str, ref: str, wrap_ref: bool = True) -> bool | None:
    """Cross-check with the `math-verify` package; None if it is unavailable or fails."""
    try:
        from math_verify import parse, verify

        gold = parse(f"${ref}$" if wrap_ref else ref)
        return bool(verify(gold, parse(pred_text)))
    except Exception:
        return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def _num_equal(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6 * max(1.0, abs(float(b)))
    except ValueError:
        return False


def _few_shot_answer(answer: str, kind: str) -> str | None:
    """The graded number of a few-shot answer: the first number written ('first-number'), or
    the last number of the first line ('line-last-number': a worked answer ending in its
    result, before the model goes on with a question of its own)."""
    text = answer.lstrip("\n").split("\n", 1)[0] if kind == "line-last-number" else answer
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    return nums[-1 if kind == "line-last-number" else 0].replace(",", "").rstrip(".")


FEW_SHOT_KINDS = ("first-number", "line-last-number")


def grade(answer: str, reference: str, kind: str) -> GradeResult:
    """Grade `answer` against `reference`. kind: 'math' (boxed, normalized, sympy), 'number'
    (GSM8K-style: last number of the last box or of the text), 'first-number' (the built-in
    few-shot sets: the first number written) or 'line-last-number' (worked few-shot answers:
    the last number of the first line); the few-shot kinds have no math-verify cross-check."""
    try:
        if kind == "math":
            box = last_boxed(answer)
            ok = box is not None and math_equal(box, reference)
            mv = math_verify_equal(answer, reference) if box is not None else False
            return GradeResult(box, ok, mv)
        if kind in FEW_SHOT_KINDS:
            pred = _few_shot_answer(answer, kind)
            return GradeResult(pred, pred is not None and _num_equal(pred, reference), None)
        box = last_boxed(answer)
        pred = last_number(box if box is not None else answer)
        ok = pred is not None and _num_equal(pred, reference)
        mv = math_verify_equal(answer, reference)
        return GradeResult(pred, ok, mv)
    except Exception as exc:  # never crash on a malformed answer
        return GradeResult(None, False, None, error=f"{type(exc).__name__}: {exc}")


def _canonical_number(text: str | None) -> str | None:
    try:
        return None if text is None else f"{float(text):.12g}"
    except ValueError:
        return None


def answer_key(answer: str, kind: str) -> str | None:
    """The answer `grade` would extract from `answer`, normalised so that equal answers are
    equal strings (None: no answer). Used to pool particles by answer for the weighted vote;
    MATH answers are compared after `normalize`, without sympy (fast, slightly stricter)."""
    try:
        if kind == "math":
            box = last_boxed(answer)
            return None if box is None else normalize(box)
        if kind in FEW_SHOT_KINDS:
            return _canonical_number(_few_shot_answer(answer, kind))
        box = last_boxed(answer)
        return _canonical_number(last_number(box if box is not None else answer))
    except Exception:  # never crash on a malformed answer: it has no answer
        return None


def gsm8k_reference(solution: str) -> str:
    """The number after '####' in a GSM8K solution, commas removed."""
    return solution.split("####")[-1].strip().replace(",", "")
