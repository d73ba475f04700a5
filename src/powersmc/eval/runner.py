"""Run every (problem, seed, method), one JSON line per result, resumable after a kill.

The run directory's settings are fixed by its `config.json`: re-running the same command
resumes it (`eval.store`), other settings are refused. The work is a list of units
(`eval.units`) run here one after another on one model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.eval.data import Problem
from powersmc.eval.labels import model_label
from powersmc.eval.store import CONFIG, RunLog
from powersmc.eval.units import Settings, plan, run_unit
from powersmc.methods.registry import check_method
from powersmc.models import DEFAULT_MODEL_NAME


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


def run_eval(
    model: LanguageModel,
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
) -> list[dict]:
    """Evaluate `methods` on `problems` for each seed; returns all results (old and new)."""
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
    _check_config(out, config)
    settings = Settings(alpha, max_new_tokens, options)
    with RunLog(out, len(problems) * len(seeds) * len(methods), progress) as log:
        for unit in plan(problems, methods, seeds, template, batch_prompts, log.done):
            for row in run_unit(model, unit, settings):
                log.write(row)
        return log.results
