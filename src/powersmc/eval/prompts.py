"""Prompt templates for evaluation.

* 'karan-du' (raw text, for base models): the MATH500 prompt of Karan & Du, with the literal
  doubled braces of their code: `\\boxed{{}}`.
* 'chat' (default for chat models): the problem followed by the common instruction, placed in
  the tokenizer's chat template by the backend.
* a file: its text with `{problem}` substituted.
"""

from __future__ import annotations

from pathlib import Path

from powersmc.errors import InputError

KARAN_DU = (
    "Can you solve the following math problem? {problem} Please reason step by step, and put "
    "your final answer within \\boxed{{{{}}}}."
)
CHAT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
TEMPLATES = {"karan-du": KARAN_DU, "chat": CHAT}


def load_template(name_or_path: str) -> str:
    """A built-in template name or a file whose text contains '{problem}'."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError("--template", f"one of {', '.join(TEMPLATES)} or a file", name_or_path)
    text = path.read_text(encoding="utf-8")
    if "{problem}" not in text:
        raise InputError("--template", "a file containing '{problem}'", name_or_path)
    return text.replace("{", "{{").replace("}", "}}").replace("{{problem}}", "{problem}")


def render(template: str, problem: str) -> str:
    return template.format(problem=problem)
