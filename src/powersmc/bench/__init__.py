"""`powersmc bench`: Sec. 6 measured on one backend and device, next to its predictions.

Every ratio is taken side by side in one process, alternating the two sides, repeated, and
reported as a median with its spread. Lengths are forced (EOS disabled through `NoEOS`) so that
both sides decode exactly T tokens per sequence; that changes the target, which is fine for a
latency measurement and nothing else.

`powersmc.bench.report` writes the measurements up (bench.md, the s(b) plot);
`powersmc.bench.vllm_sampling` times Power-SMC on vLLM against vLLM's own sampling (driven by
`benchmarks/vllm_bench.py`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from powersmc import cost
from powersmc.backends.protocol import LanguageModel
from powersmc.bench.report import markdown, plot_s
from powersmc.runtime.api import mh_sample, sample, smc_sample, smc_sample_many


class NoEOS:
    """A backend view with no EOS ids, so every sequence runs to max_new_tokens."""

    def __init__(self, lm: LanguageModel) -> None:
        self._lm = lm
        self.eos_token_ids: tuple[int, ...] = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lm, name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[..., Any], *args: Any,
           **kwargs: Any) -> tuple[float, Any]:
    """(wall-clock seconds, result) of fn(*args, **kwargs), device work included."""
    _sync(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    _sync(device)
    return time.perf_counter() - start, result


def _decode_steps(lm: LanguageModel, state: Any, tok: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        lm.step(state, tok)


def batch_throughput(lm: LanguageModel, prompt_ids: list[int], batches: list[int],
                     steps: int = 16, repeats: int = 3) -> dict[int, float]:
    """s(b) = b * t(1) / t(b), from the median time of one decode step at batch b."""
    per_step = {}
    for b in batches:
        times = []
        for _ in range(repeats):
            state, logp = lm.prefill(prompt_ids, b, budget=b * (steps + 2))
            tok = logp.argmax(-1)
            lm.step(state, tok)  # warm-up step
            times.append(_timed(lm.device, _decode_steps, lm, state, tok, steps)[0] / steps)
        per_step[b] = statistics.median(times)
    return {b: b * per_step[1] / per_step[b] for b in batches}


def _spread(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs),
            "max": max(xs), "n": len(xs)}


def smc_overhead(lm: LanguageModel, prompt: str | list[int], *, particles: int, tokens: int,
                 alpha: float, repeats: int, ess_threshold: float = 0.5) -> dict[str, Any]:
    """Wall-clock of smc_sample / plain batched sampling of N sequences (tau = 1/alpha), and of
    smc_sample / batch-1 decoding, both for T forced tokens, alternating and repeated."""
    forced = NoEOS(lm)
    kw = dict(max_new_tokens=tokens)
    ratios, rel, resamples, native, step_ms = [], [], [], [], []
    dev = lm.device
    for r in range(repeats + 1):
        t_smc, res = _timed(dev, smc_sample, forced, prompt, alpha=alpha, particles=particles,
                            ess_threshold=ess_threshold, seed=r, **kw)
        t_batch, _ = _timed(dev, sample, forced, prompt, temperature=1 / alpha,
                            num_samples=particles, seed=r, **kw)
        t_one, _ = _timed(dev, sample, forced, prompt, temperature=1.0, seed=r, **kw)
        t_native = (_timed(dev, native_sampling, lm, prompt, particles, tokens, alpha, r)[0]
                    if hasattr(lm, "sample_native") else None)
        if r == 0:
            continue  # warm-up round
        ratios.append(t_smc / t_batch)
        rel.append(t_smc / t_one)
        resamples.append(len(res.resample_steps))
        if t_native is not None:
            native.append(t_smc / t_native)
        step_ms.append(1e3 * t_smc / tokens)
    out = {"overhead": _spread(ratios), "relative_latency": _spread(rel),
           "resamples_per_run": statistics.mean(resamples), "smc_step_ms": _spread(step_ms)}
    if native:
        out["overhead_native"] = _spread(native)
    return out


def native_sampling(lm: Any, prompt: str | list[int], rows: int, tokens: int, alpha: float,
                    seed: int) -> np.ndarray:
    """The engine's own batched sampling of `rows` sequences of `tokens` tokens at temperature
    1/alpha (llama.cpp: its C sampler chain), prompt prefilled once and shared."""
    ids = lm.encode_prompt(prompt)
    state, logp = lm.prefill(ids, rows, budget=rows * (tokens + 1))
    gen = torch.Generator().manual_seed(seed)
    first = torch.multinomial(torch.softmax(logp * alpha, -1), 1, generator=gen).squeeze(1)
    return lm.sample_native(state, first, tokens - 1, 1.0 / alpha, seed)


def compare_backends(lms: dict[str, LanguageModel], prompt: str | list[int], *, particles: int,
                     tokens: int, alpha: float, repeats: int) -> dict[str, Any]:
    """Power-SMC answers (N particles, T forced tokens) on each backend, alternating backends
    round by round: seconds per answer and per SMC step, and each backend's time relative to
    the first one's."""
    times: dict[str, list[float]] = {name: [] for name in lms}
    for r in range(repeats + 1):
        for name, lm in lms.items():
            t, _ = _timed(lm.device, smc_sample, NoEOS(lm), prompt, alpha=alpha,
                          particles=particles, max_new_tokens=tokens, seed=r)
            if r > 0:  # round 0 warms up
                times[name].append(t)
    first = next(iter(lms))
    return {name: {"answer_seconds": _spread(ts),
                   "step_ms": 1e3 * statistics.median(ts) / tokens,
                   "speedup_of_first": statistics.median(ts) / statistics.median(times[first])}
            for name, ts in times.items()}


# Prompts of different lengths for the several-prompts measurement (the bench prompt comes first).
OTHER_PROMPTS = (
    "What is 17 times 23?",
    "Write a short poem about the sea, in four lines, with a rhyme at the end of each pair.",
    "List three prime numbers.",
    "Explain in two sentences what a hash table is and why lookups are fast on average.",
    "Name the capital of France.",
    "Describe the water cycle for a ten-year-old, step by step.",
    "Why do leaves change colour in autumn?",
)


def multi_prompt_gain(lm: LanguageModel, prompts: list[str | list[int]], *, particles: int,
                      tokens: int, alpha: float, repeats: int) -> dict[str, Any]:
    """P prompts x N particles in one batch (`smc_sample_many`) against the same P prompts run
    one after another (`smc_sample`), T forced tokens, alternating rounds: the throughput gain
    t(sequential) / t(batched), to set beside s(P*N) / s(N) predicted by Lemma 1."""
    forced, dev = NoEOS(lm), lm.device
    kw = dict(alpha=alpha, particles=particles, max_new_tokens=tokens)
    gains, t_seq, t_bat = [], [], []
    for r in range(repeats + 1):
        seq, _ = _timed(dev, lambda r=r: [smc_sample(forced, p, seed=r, **kw) for p in prompts])
        bat, _ = _timed(dev, smc_sample_many, forced, prompts, seed=r, **kw)
        if r == 0:
            continue  # warm-up round
        gains.append(seq / bat)
        t_seq.append(seq)
        t_bat.append(bat)
    return {"prompts": len(prompts), "gain": _spread(gains),
            "sequential_seconds": statistics.median(t_seq),
            "batched_seconds": statistics.median(t_bat)}


def profile_smc(lm: LanguageModel, prompt: str | list[int], *, particles: int, tokens: int,
                alpha: float) -> dict[str, float]:
    """Seconds spent under each `powersmc.*` label of smc_sample, and the total."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if lm.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        start = time.perf_counter()
        smc_sample(NoEOS(lm), prompt, alpha=alpha, particles=particles, max_new_tokens=tokens,
                   seed=0)
        _sync(lm.device)
        total = time.perf_counter() - start
    out = {"total": total}
    for ev in prof.key_averages():
        if ev.key.startswith("powersmc."):
            out[ev.key.split(".", 1)[1]] = ev.cpu_time_total / 1e6
    out["model"] = out.get("forward", 0.0) - out.get("normalize", 0.0)
    return out


def mh_vs_smc(lm: LanguageModel, prompt: str | list[int], *, particles: int, tokens: int,
              alpha: float, blocks: int, moves: int, s_n: float) -> dict[str, Any]:
    forced, dev = NoEOS(lm), lm.device
    out: dict[str, Any] = {}
    res: dict[str, Any] = {}
    out["smc_seconds"], res["smc"] = _timed(dev, smc_sample, forced, prompt, alpha=alpha,
                                            particles=particles, max_new_tokens=tokens, seed=0)
    # the first token of every method is drawn from the prefill's logits; count it as the
    # paper's cost model does (one token-eval per sequence per generated token)
    out["smc_token_evals"] = res["smc"].cost.token_evals + particles
    for mode in ("exact", "faithful"):
        out[f"mh_{mode}_seconds"], res[mode] = _timed(
            dev, mh_sample, forced, prompt, alpha=alpha, max_new_tokens=tokens,
            num_blocks=blocks, mh_moves=moves, mode=mode, seed=0)
        out[f"mh_{mode}_token_evals"] = res[mode].cost.token_evals + 1
        out[f"mh_{mode}_acceptance"] = res[mode].stats["acceptance_rate"]
    out["predicted_mh_token_evals"] = cost.mh_global_edit_token_evals(tokens, moves, blocks,
                                                                      exact=True)
    out["predicted_smc_token_evals"] = cost.smc_token_evals(particles, tokens)
    out["predicted_compute_ratio"] = cost.mh_smc_compute_ratio(moves, blocks, particles)
    out["predicted_time_ratio"] = cost.mh_smc_time_ratio(moves, blocks, particles, s_n)
    for mode in ("exact", "faithful"):
        out[f"measured_compute_ratio_{mode}"] = (out[f"mh_{mode}_token_evals"]
                                                 / out["smc_token_evals"])
        out[f"measured_time_ratio_{mode}"] = out[f"mh_{mode}_seconds"] / out["smc_seconds"]
    return out


def run_bench(lm: LanguageModel, prompt: str | list[int], *, particles: int, tokens: int,
              alpha: float, repeats: int, batches: list[int], mh_tokens: int, mh_blocks: int,
              mh_moves: int, out_dir: str | Path, prompts: int = 4,
              several: list[str | list[int]] | None = None,
              others: dict[str, LanguageModel] | None = None, name: str = "model",
              load_seconds: dict[str, float] | None = None,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every Sec. 6 measurement on `lm`; writes bench.json, bench.md, batch_throughput.png.

    `several`: the prompts of the several-prompts measurement (default: `prompt` and the
    first `prompts` - 1 of OTHER_PROMPTS). `others`: more backends (by name) whose SMC answer
    time and profile are measured side by side with `lm` (called `name`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = lm.encode_prompt(prompt)
    progress("measuring s(b) ...")
    s = batch_throughput(lm, ids, batches)
    s_n = s.get(particles) or s[max(b for b in s if b <= particles)]
    progress("measuring SMC overhead ...")
    over = smc_overhead(lm, prompt, particles=particles, tokens=tokens, alpha=alpha,
                        repeats=repeats)
    several = list(several) if several is not None else [prompt, *OTHER_PROMPTS][:prompts]
    progress(f"{len(several)} prompts in one batch vs one after another ...")
    many = multi_prompt_gain(lm, several, particles=particles, tokens=tokens, alpha=alpha,
                             repeats=repeats)
    pn = len(several) * particles
    many["predicted_gain"] = s[pn] / s_n if pn in s else None
    progress("profiling one SMC run ...")
    prof = profile_smc(lm, prompt, particles=particles, tokens=tokens, alpha=alpha)
    backends = None
    if others:
        progress("backends side by side ...")
        backends = compare_backends({name: lm, **others}, prompt, particles=particles,
                                    tokens=tokens, alpha=alpha, repeats=repeats)
        for other, olm in others.items():
            progress(f"profiling one SMC run on {other} ...")
            backends[other]["profile"] = profile_smc(olm, prompt, particles=particles,
                                                     tokens=tokens, alpha=alpha)
        backends[name]["profile"] = prof
    progress("MH vs SMC ...")
    mh = mh_vs_smc(lm, prompt, particles=particles, tokens=mh_tokens, alpha=alpha,
                   blocks=mh_blocks, moves=mh_moves, s_n=s_n)
    result = {
        "device": str(lm.device), "torch_threads": torch.get_num_threads(),
        "particles": particles, "tokens": tokens, "alpha": alpha, "repeats": repeats,
        "s": s, "smc": over, "predicted_relative_latency": cost.smc_relative_latency(
            particles, s_n), "profile": prof, "mh_vs_smc": mh,
        "several_prompts": many, "backend": name, "backends": backends,
        "load_seconds": load_seconds or {},
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))
    plot_s(s, out / "batch_throughput.png")
    return result
