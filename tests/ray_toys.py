"""A toy model for the Ray evaluation tests, built by a picklable factory on each worker, with
faults keyed to a problem's question: 'raise' raises; 'die PATH' kills its worker process
(SIGKILL, as the out-of-memory killer does) unless PATH exists; 'kill-once PATH' has Ray kill
its own actor unless PATH exists, and creates PATH (atomically: once, whoever gets there first)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from eval_worker import VOCAB, DigitLM, _next

from powersmc.eval.data import Problem
from powersmc.models import ModelSpec

KW = dict(methods=["plain", "lowtemp", "smc"], seeds=[0, 1], template="{problem}", alpha=4.0,
          max_new_tokens=6, options={"particles": 4}, progress=False)
TIMING = ("seconds", "batch_seconds", "peak_memory_mb")


class FaultyLM(DigitLM):
    def encode_prompt(self, prompt):
        if isinstance(prompt, str):
            if prompt.startswith("raise"):
                raise ValueError("this problem always fails")
            word, *path = prompt.split()
            if word == "die" and not Path(path[0]).exists():
                os.kill(os.getpid(), signal.SIGKILL)
            if word == "kill-once" and _first(path[0]):
                import ray

                ray.kill(ray.get_runtime_context().current_actor)
                time.sleep(60)  # killed while this unit is in flight
        return super().encode_prompt(prompt)


def _first(path: str) -> bool:
    """Create `path`; True for the one caller that created it (atomic: two workers running
    the problem's units at once cannot both kill theirs)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def faulty_lm(threads: int | None = None) -> FaultyLM:
    return FaultyLM(_next, VOCAB, [10])


SPEC = ModelSpec({"threads": 1}, faulty_lm)  # one CPU per worker, whatever the cluster has


def problems(n: int = 6, extra: tuple[str, ...] = ()) -> list[Problem]:
    """n plain problems, then one problem per `extra` question (a fault trigger)."""
    return ([Problem(f"p{i}", f"{i}+{i}", str(2 * i), "number") for i in range(n)]
            + [Problem(f"x{i}", q, "0", "number") for i, q in enumerate(extra)])


def rows(results: list[dict]) -> list[str]:
    """Result rows without their timings, sorted: what must not depend on who ran them."""
    return sorted(json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True)
                  for r in results)
