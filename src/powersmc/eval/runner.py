"""Run every (problem, seed, method), one JSON line per result, resumable after a kill.

Results are appended to `results.jsonl` as each is produced (flushed and fsync'ed). On restart
with the same command, the finished (problem, method, seed) keys are read back and skipped; a
last line cut off by the kill is dropped, so nothing is lost or duplicated. The methods run
side by side on each problem with the same derived seed, so per-problem latency ratios compare
the same work on the same machine state.

With `batch_prompts` = P > 1, Power-SMC runs P problems at a time in one batch of P x N
particles (`smc_sample_many`); each of its results records the batch wall-clock and, as
`seconds`, that time divided by the batch's problems (throughput, not single-answer latency).
The batch seed is derived from its first problem, so a resumed run may batch, and hence
sample, differently from an uninterrupted one; every result is still an exact Power-SMC draw.

Results with weighted particles (Power-SMC, best-of-N) are graded twice: the drawn answer (the
paper's output: `answer`, `correct`) and the weighted vote over all particles, answers pooled
by the grader's extraction and normalisation (`voted_answer`, `voted_correct`, ...;
`methods.selection.weighted_vote`), so one run grades both.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.eval.data import Problem
from powersmc.eval.grading import answer_key, grade
from powersmc.eval.labels import model_label
from powersmc.eval.prompts import render
from powersmc.methods.registry import check_method, run_method, run_smc_many
from powersmc.methods.selection import normalized, weighted_vote
from powersmc.models import DEFAULT_MODEL_NAME

RESULTS = "results.jsonl"
CONFIG = "config.json"


def derived_seed(seed: int, problem_id: str) -> int:
    """The seed of one (problem, seed) cell, shared by all methods (common random numbers)."""
    return zlib.crc32(f"{seed}:{problem_id}".encode()) & 0x7FFFFFFF


def read_results(path: Path) -> list[dict]:
    """Complete result lines of a results file; a truncated last line is removed from disk."""
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


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


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
    path = out / RESULTS
    results = read_results(path)
    done = {(r["problem_id"], r["method"], r["seed"]) for r in results}
    correct: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        correct[r["method"]][0] += r["correct"]
        correct[r["method"]][1] += 1
    total = len(problems) * len(seeds) * len(methods)
    bar = tqdm(total=total, initial=len(done), desc="eval", unit="run", disable=not progress,
               file=sys.stderr)

    def write(rec: dict) -> None:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        results.append(rec)
        correct[rec["method"]][0] += rec["correct"]
        correct[rec["method"]][1] += 1
        bar.update(1)
        bar.set_postfix_str(" ".join(
            f"{m}={c / n:.0%}" for m, (c, n) in correct.items() if n))

    batched = "smc" if batch_prompts > 1 else None
    with path.open("a", encoding="utf-8") as fh:
        for first in range(0, len(problems), batch_prompts):
            chunk = problems[first : first + batch_prompts]
            prompts = {p.id: render(template, p.question) for p in chunk}
            for seed in seeds:
                if batched in methods:
                    todo = [p for p in chunk if (p.id, batched, seed) not in done]
                    if todo:
                        for rec in _batch(model, todo, [prompts[p.id] for p in todo], seed,
                                          alpha, max_new_tokens, options):
                            write(rec)
                for problem in chunk:
                    for method in methods:
                        if method == batched or (problem.id, method, seed) in done:
                            continue
                        write(_one(model, problem, prompts[problem.id], method, seed, alpha,
                                   max_new_tokens, options))
    bar.close()
    return results


def _one(model, problem, prompt, method, seed, alpha, max_new_tokens, options) -> dict:
    _reset_peak_memory(model.device)
    run_seed = derived_seed(seed, problem.id)
    start = time.perf_counter()
    res = run_method(method, model, prompt, alpha=alpha, max_new_tokens=max_new_tokens,
                     seed=run_seed, **options)
    wall = time.perf_counter() - start
    return _record(model, problem, method, seed, run_seed, res, wall)


def _batch(model, problems, prompts, seed, alpha, max_new_tokens, options) -> list[dict]:
    """Power-SMC on several problems in one batch; per-result seconds are amortised."""
    _reset_peak_memory(model.device)
    run_seed = derived_seed(seed, problems[0].id)
    start = time.perf_counter()
    out = run_smc_many(model, prompts, alpha=alpha, max_new_tokens=max_new_tokens,
                       seed=run_seed, **options)
    wall = time.perf_counter() - start
    ids = [p.id for p in problems]
    return [
        {**_record(model, p, "smc", seed, run_seed, res, wall / len(problems)),
         "batch_seconds": wall, "batch_problems": ids}
        for p, res in zip(problems, out, strict=True)
    ]


def _record(model, problem, method, seed, run_seed, res, seconds) -> dict:
    g = grade(res.text, problem.answer, problem.kind)
    return {
        "problem_id": problem.id, "method": method, "seed": seed, "run_seed": run_seed,
        "reference": problem.answer, "answer": res.text, "extracted": g.extracted,
        "correct": g.correct, "correct_math_verify": g.correct_math_verify,
        "grading_error": g.error, "seconds": seconds, "generated_tokens": len(res.token_ids),
        "finished": res.finished, "token_evals": res.cost.token_evals,
        "forward_passes": res.cost.forward_passes, "prefill_tokens": res.cost.prefill_tokens,
        "peak_memory_mb": _peak_memory_mb(model.device), "meta": problem.meta,
        **(_vote(res, problem) if getattr(res, "particles", None) else {}),
    }


def _vote(res, problem) -> dict:
    """The weighted vote over a result's particles, graded: answers pooled by `answer_key`;
    `voted_weight` is the winning answer's share of the normalised weight (0: no particle
    has an answer, and the drawn answer stands)."""
    keys = [answer_key(p.text, problem.kind) for p in res.particles]
    v = weighted_vote(res.particles, key=lambda text: answer_key(text, problem.kind))
    text = res.text if v is None else res.particles[v].text
    share = 0.0 if v is None else sum(
        w for k, w in zip(keys, normalized(res.particles), strict=True) if k == keys[v])
    g = grade(text, problem.answer, problem.kind)
    return {"voted_answer": text, "voted_extracted": g.extracted, "voted_correct": g.correct,
            "voted_correct_math_verify": g.correct_math_verify, "voted_weight": share}


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


