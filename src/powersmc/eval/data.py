"""Evaluation problems: MATH500, GSM8K (local JSONL or Hugging Face id) and the built-in sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

from powersmc.errors import InputError
from powersmc.eval.builtin import BUILTIN_SETS
from powersmc.eval.grading import gsm8k_reference
from powersmc.eval.problem import Problem

HF_IDS = {"math500": ("HuggingFaceH4/MATH-500", "test"), "gsm8k": ("openai/gsm8k", "test")}

__all__ = ["Problem", "apply_subset", "load_problems"]


def _from_record(rec: dict, index: int) -> Problem:
    if "problem" in rec and "answer" in rec:  # MATH / MATH500
        meta = {k: rec[k] for k in ("subject", "level") if k in rec}
        return Problem(str(rec.get("unique_id", index)), rec["problem"], str(rec["answer"]),
                       "math", meta)
    if "question" in rec and "answer" in rec:  # GSM8K
        return Problem(str(rec.get("id", index)), rec["question"],
                       gsm8k_reference(str(rec["answer"])), "number")
    raise InputError("dataset", "records with problem/answer (MATH) or question/answer (GSM8K)",
                     sorted(rec))


def _read_jsonl(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError("dataset", f"a readable JSONL file ({exc})", str(path)) from exc


def _load_hub(dataset_id: str, split: str) -> list[dict]:
    try:
        import datasets

        if dataset_id == "openai/gsm8k":
            return list(datasets.load_dataset(dataset_id, "main", split=split))
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as exc:
        raise InputError("dataset", f"a loadable dataset ({type(exc).__name__})", dataset_id) \
            from exc


def load_problems(dataset: str, *, limit: int | None = None,
                  subset: str | None = None) -> list[Problem]:
    """Problems from 'builtin', 'builtin-multi', 'builtin-long', 'math500', 'gsm8k', a local
    JSONL path or a hub dataset id.

    'math500' / 'gsm8k' read `$POWERSMC_DATA_DIR/<name>.jsonl` when that file exists, else the
    hub. subset: 'i:j' index range, 'level=5', 'subject=Algebra' (comma-separated, AND-ed).
    limit: keep the first N after filtering.
    """
    if dataset in BUILTIN_SETS:
        problems = BUILTIN_SETS[dataset]()
    else:
        path = Path(os.path.expanduser(dataset))
        local = Path(os.environ.get("POWERSMC_DATA_DIR", "")) / f"{dataset}.jsonl"
        if path.is_file():
            records = _read_jsonl(path)
        elif dataset in HF_IDS and os.environ.get("POWERSMC_DATA_DIR") and local.is_file():
            records = _read_jsonl(local)
        elif dataset in HF_IDS:
            records = _load_hub(*HF_IDS[dataset])
        elif dataset.count("/") == 1 and not dataset.startswith((".", "/", "~")):
            records = _load_hub(dataset, "test")
        else:
            raise InputError("dataset", "builtin, builtin-multi, builtin-long, math500, gsm8k, "
                             "a JSONL path or a hub id", dataset)
        problems = [_from_record(r, i) for i, r in enumerate(records)]
    problems = apply_subset(problems, subset)
    if limit is not None:
        if limit < 1:
            raise InputError("limit", "an integer >= 1", limit)
        problems = problems[:limit]
    if not problems:
        raise InputError("subset", "a selection that keeps at least one problem", subset)
    return problems


def apply_subset(problems: list[Problem], subset: str | None) -> list[Problem]:
    if not subset:
        return problems
    out = problems
    for part in subset.split(","):
        part = part.strip()
        if ":" in part and "=" not in part:
            try:
                a, b = (int(x) if x else None for x in part.split(":"))
            except ValueError:
                raise InputError("subset", "'i:j', 'level=N' or 'subject=NAME'", subset) from None
            out = out[a:b]
        elif "=" in part:
            key, val = (x.strip() for x in part.split("=", 1))
            out = [p for p in out if str(p.meta.get(key, "")).lower() == val.lower()]
        else:
            raise InputError("subset", "'i:j', 'level=N' or 'subject=NAME'", subset)
    return out
