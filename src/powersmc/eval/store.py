"""The files of a run directory and their one writer.

`results.jsonl` holds one graded result per line, appended as each is produced (flushed and
fsync'ed). On restart the finished (problem, method, seed) keys are read back and skipped; a
last line cut off by a kill is dropped, so nothing is lost or duplicated. `failures.jsonl`
records units that failed every attempt on Ray workers (`eval.ray_pool`), one line per
(problem, method, seed), with the error; such a key has no result, so a re-run tries it again.
Only the driver process writes these files, whoever computes the rows.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from powersmc.eval.units import Key

RESULTS = "results.jsonl"
CONFIG = "config.json"
FAILURES = "failures.jsonl"
WORKERS = "workers.json"


def read_results(path: Path) -> list[dict]:
    """Complete lines of a JSONL file; a truncated last line is removed from disk."""
    if not path.exists():
        return []
    good: list[dict] = []
    keep_bytes = 0
    with path.open("rb") as fh:
        for raw in fh:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("truncated line")
                good.append(json.loads(raw))
                keep_bytes += len(raw)
            except ValueError:
                break
    if keep_bytes != path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(keep_bytes)
    return good


def key_of(row: dict) -> Key:
    return (row["problem_id"], row["method"], row["seed"])


class RunLog:
    """Appends result rows and failures to a run directory, one fsync'ed line each, and
    drives the one progress bar (results, accuracy per method, failures, ETA)."""

    def __init__(self, out: Path, total: int, progress: bool) -> None:
        self.out = out
        self.results = read_results(out / RESULTS)
        self.done = {key_of(r) for r in self.results}
        read_results(out / FAILURES)  # drop a failure line cut off by a kill
        self.failed = 0
        self._correct: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.results:
            self._count(r)
        self._fh = (out / RESULTS).open("a", encoding="utf-8")
        self._bar = tqdm(total=total, initial=len(self.done), desc="eval", unit="run",
                         disable=not progress, file=sys.stderr)

    def write(self, row: dict) -> None:
        """Append one result row."""
        _append(self._fh, row)
        self.results.append(row)
        self.done.add(key_of(row))
        self._count(row)
        self._bar.update(1)
        self._postfix()

    def fail(self, keys: list[Key], error: str, attempts: int) -> None:
        """Record that the rows `keys` could not be computed; they stay to do."""
        with (self.out / FAILURES).open("a", encoding="utf-8") as fh:
            for problem_id, method, seed in keys:
                _append(fh, {"problem_id": problem_id, "method": method, "seed": seed,
                             "error": error, "attempts": attempts})
        self.failed += len(keys)
        self._bar.update(len(keys))
        self._postfix()

    def close(self) -> None:
        self._bar.close()
        self._fh.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, row: dict) -> None:
        self._correct[row["method"]][0] += row["correct"]
        self._correct[row["method"]][1] += 1

    def _postfix(self) -> None:
        acc = [f"{m}={c / n:.0%}" for m, (c, n) in self._correct.items() if n]
        self._bar.set_postfix_str(" ".join(acc + ([f"failed={self.failed}"] if self.failed
                                                  else [])))


def _append(fh, row: dict) -> None:
    fh.write(json.dumps(row) + "\n")
    fh.flush()
    os.fsync(fh.fileno())
