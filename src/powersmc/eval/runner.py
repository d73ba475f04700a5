"""Run every (problem, seed, method), one JSON line per result, resumable after a kill.

The run directory's settings are fixed by its `config.json`: re-running the same command
resumes it (`eval.store`), other settings are refused. The work is a list of units
(`eval.units`), run here one after another on one model, or on K Ray workers
(`eval.ray_pool`); either way the same rows, written by this process alone.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.eval.budget import (
    CALIBRATION_PROBLEMS,
    calibrate,
    check_budget,
    in_process_costs,
    worker_costs,
)
from powersmc.eval.data import Problem
from powersmc.eval.labels import model_label
from powersmc.eval.prompts import render
from powersmc.eval.ray_pool import WorkerPool
from powersmc.eval.store import CONFIG, RunLog
from powersmc.eval.units import Settings, plan, run_stream, run_unit
from powersmc.methods.registry import check_method
from powersmc.models import DEFAULT_MODEL_NAME, ModelSpec


def _check_config(out: Path, config: dict) -> None:
    cfg_path = out / CONFIG
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if model_label(old.get("model")) == model_label(config.get("model")) == DEFAULT_MODEL_NAME:
            old["model"] = config.get("model")  # runs that named the default model by its path
        if "backend" in config:  # runs made before backends were recorded used Transformers
            old.setdefault("backend", "transformers")
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise InputError("--out", f"a new directory, or the same settings as the run "
                             f"already there (differs in: {', '.join(changed)})", str(out))
    else:
        cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _budget(out: Path, config: dict, problems: list[Problem], template: str, budget: int,
            on_workers: Callable[[], WorkerPool | None], here: Callable[[], LanguageModel]
            ) -> dict:
    """The run's calibration for `budget`: the recorded one when resuming the same run (its
    measurements are logged on stderr), else measured on the run's workers, or here."""
    path = out / CONFIG
    if path.exists():
        old = json.loads(path.read_text()).get("budget")
        if old and old.get("particles") == budget:
            return old
    probs = problems[:CALIBRATION_PROBLEMS]
    prompts = [render(template, p.question) for p in probs]
    alpha, tokens = config["alpha"], config["max_new_tokens"]
    pool = on_workers()
    costs = worker_costs(pool, probs, prompts, alpha, tokens) if pool is not None else \
        in_process_costs(here(), probs, prompts, alpha, tokens)
    return calibrate(costs, config["methods"], budget, config["options"], [p.id for p in probs],
                     progress=lambda m: print(m, file=sys.stderr))


def run_eval(
    model: LanguageModel | ModelSpec | WorkerPool,
    problems: list[Problem],
    *,
    methods: list[str],
    seeds: list[int],
    out_dir: str | os.PathLike,
    template: str,
    alpha: float = 4.0,
    max_new_tokens: int = 512,
    options: dict[str, Any] | None = None,
    config_extra: dict[str, Any] | None = None,
    progress: bool = True,
    batch_prompts: int = 1,
    workers: int | None = None,
    ray_address: str | None = None,
    budget: int | None = None,
) -> list[dict]:
    """Evaluate `methods` on `problems` for each seed; returns all results (old and new).

    `model`: a loaded model, run in this process; a `ModelSpec`, built here, or with
    `workers` = K built by each of K Ray workers (joining the cluster at `ray_address`, else
    starting a local one); or a started `WorkerPool`. Units that fail on every attempt on Ray
    are recorded in failures.jsonl (the in-process path stops at the first exception).
    `budget` = N: every method's knob set for the token-evals of Power-SMC with N particles
    (`eval.budget`), calibrated on the first problems (here, or on the workers) and recorded
    in the config.
    """
    if ray_address is not None and workers is None:
        raise InputError("ray_address", "set only with workers", ray_address)
    pool = None
    if workers is not None:
        if not isinstance(model, ModelSpec):
            raise InputError("workers", "a ModelSpec as the model (each Ray worker builds its "
                             "own)", type(model).__name__)
        pool = WorkerPool(model, workers, address=ray_address)
    for m in methods:
        check_method(m)
    if not seeds:
        raise InputError("--seeds", "at least one seed", seeds)
    if isinstance(batch_prompts, bool) or not isinstance(batch_prompts, int) or batch_prompts < 1:
        raise InputError("--batch-prompts", "an integer >= 1", batch_prompts)
    options = dict(options or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"methods": methods, "seeds": seeds, "alpha": alpha,
              "max_new_tokens": max_new_tokens, "template": template,
              "options": {k: v for k, v in sorted(options.items()) if k != "progress"},
              "problems": [p.id for p in problems], **(config_extra or {})}
    if batch_prompts > 1:  # absent at 1, so runs made before the option still resume
        config["batch_prompts"] = batch_prompts
    with ExitStack() as stack:
        @functools.cache
        def on_workers() -> WorkerPool | None:
            """The workers that run this run's units, started at first use (None: here)."""
            if isinstance(model, WorkerPool):
                return model
            return None if pool is None else stack.enter_context(pool)

        @functools.cache
        def here() -> LanguageModel:
            """The model that runs this run's units in this process, built at first use."""
            assert not isinstance(model, WorkerPool)
            return model.build() if isinstance(model, ModelSpec) else model

        if budget is not None:
            check_budget(budget)
            config["budget"] = _budget(out, config, problems, template, budget, on_workers, here)
        _check_config(out, config)
        knobs = config["budget"]["knobs"] if budget is not None else {}
        settings = Settings(alpha, max_new_tokens, options, knobs)
        log = stack.enter_context(RunLog(out, len(problems) * len(seeds) * len(methods),
                                         progress))
        units = plan(problems, methods, seeds, template, batch_prompts, log.done)
        runner = on_workers() if units or isinstance(model, WorkerPool) else None
        if runner is not None:  # (a finished run starts no workers)
            runner.run(units, settings, log)
        elif units:
            batched = [u for u in units if u.batched]
            if batched:  # P systems in flight across all of them, rows written as they finish
                run_stream(here(), batched, settings, batch_prompts, log.write)
            for unit in units:
                if not unit.batched:
                    for row in run_unit(here(), unit, settings):
                        log.write(row)
        return log.results
