"""`powersmc bench`'s write-up of its measurements (`powersmc.bench.run_bench`'s result):
bench.md (`markdown`: s(b), the SMC overhead and latency, the profile, the backends side by
side, MH against SMC next to Cor. 2-3's predictions) and the s(b) plot (`plot_s`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# "model" is the forward pass less "normalize" (the backend's log-softmax), which it contains.
PROFILE_LABELS = ("model", "normalize", "sample", "weights", "sync", "resample", "reorder")


def markdown(r: dict[str, Any]) -> str:
    """bench.md: the measurements of `run_bench`'s result `r`, beside their predictions."""
    o, rl = r["smc"]["overhead"], r["smc"]["relative_latency"]
    mh = r["mh_vs_smc"]
    lines = [
        f"## Bench: {r['device']}, N = {r['particles']}, T = {r['tokens']}, alpha = {r['alpha']}",
        "",
        "| b | " + " | ".join(str(b) for b in r["s"]) + " |",
        "|---|" + "---|" * len(r["s"]),
        "| s(b) | " + " | ".join(f"{v:.2f}" for v in r["s"].values()) + " |",
        "",
        f"* SMC overhead vs plain batched sampling of N sequences: median **{o['median']:.3f}** "
        f"(IQR {o['q1']:.3f}–{o['q3']:.3f}, min {o['min']:.3f}, max {o['max']:.3f}, "
        f"{o['n']} runs; {r['smc']['resamples_per_run']:.1f} resamples per run)",
        *([f"* SMC overhead vs the engine's own batched sampling (C sampler chain) of N "
           f"sequences: median **{r['smc']['overhead_native']['median']:.3f}** (IQR "
           f"{r['smc']['overhead_native']['q1']:.3f}–{r['smc']['overhead_native']['q3']:.3f})"]
          if "overhead_native" in r["smc"] else []),
        f"* Time per SMC step: median {r['smc']['smc_step_ms']['median']:.1f} ms "
        f"(IQR {r['smc']['smc_step_ms']['q1']:.1f}–{r['smc']['smc_step_ms']['q3']:.1f})",
        f"* SMC latency vs batch-1 decoding: median {rl['median']:.2f}× "
        f"(IQR {rl['q1']:.2f}–{rl['q3']:.2f}); predicted N/s(N) = "
        f"{r['predicted_relative_latency']:.2f}×",
        _several_line(r["several_prompts"], r["particles"]),
        "",
        "| SMC profile | seconds | share |", "|---|---|---|",
    ]
    total = r["profile"]["total"]
    for k in PROFILE_LABELS:
        v = r["profile"].get(k, 0.0)
        lines.append(f"| {k} | {v:.3f} | {100 * v / total:.1f}% |")
    lines += [f"| total (wall) | {total:.3f} | 100% |", ""]
    if r.get("backends"):
        lines += _backends_table(r["backends"], r["tokens"])
    if r.get("load_seconds"):
        lines += ["* Model load: " + ", ".join(f"{k} {v:.2f} s"
                                             for k, v in r["load_seconds"].items()), ""]
    lines += [
              "| MH vs SMC | token evals | seconds | ratio to SMC (compute / time) |",
              "|---|---|---|---|",
              f"| SMC | {mh['smc_token_evals']} | {mh['smc_seconds']:.2f} | 1 / 1 |"]
    for mode in ("exact", "faithful"):
        lines.append(f"| MH {mode} | {mh[f'mh_{mode}_token_evals']} | "
                     f"{mh[f'mh_{mode}_seconds']:.2f} | "
                     f"{mh[f'measured_compute_ratio_{mode}']:.2f} / "
                     f"{mh[f'measured_time_ratio_{mode}']:.2f} |")
    lines += [f"| predicted (Cor. 2-3) | {mh['predicted_mh_token_evals']:.0f} | — | "
              f"{mh['predicted_compute_ratio']:.2f} / {mh['predicted_time_ratio']:.2f} |", ""]
    return "\n".join(lines)


def _backends_table(b: dict[str, Any], tokens: int) -> list[str]:
    first = next(iter(b))
    lines = [f"| backend (SMC, T = {tokens}) | seconds per answer (median, IQR) | ms per step | "
             f"time / {first} | normalize + sample + weights share |", "|---|---|---|---|---|"]
    for name, v in b.items():
        a, p = v["answer_seconds"], v["profile"]
        share = sum(p.get(k, 0.0) for k in ("normalize", "sample", "weights")) / p["total"]
        lines.append(f"| {name} | {a['median']:.2f} ({a['q1']:.2f}–{a['q3']:.2f}) | "
                     f"{v['step_ms']:.1f} | {v['speedup_of_first']:.2f} | {100 * share:.1f}% |")
    return [*lines, ""]


def _several_line(m: dict[str, Any], particles: int) -> str:
    g = m["gain"]
    pred = ("" if m.get("predicted_gain") is None
            else f"; predicted s(PN)/s(N) = {m['predicted_gain']:.2f}×")
    return (f"* {m['prompts']} prompts × N = {particles} in one batch vs one after another: "
            f"throughput gain median **{g['median']:.2f}×** (IQR {g['q1']:.2f}–{g['q3']:.2f}; "
            f"{m['sequential_seconds']:.2f} s vs {m['batched_seconds']:.2f} s){pred}")


def plot_s(s: dict[int, float], path: Path) -> None:
    """The measured s(b) against the ideal s(b) = b (log-log), as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bs = list(s)
    ax.plot(bs, [s[b] for b in bs], "o-", label="measured s(b)")
    ax.plot(bs, bs, "--", color="gray", label="ideal s(b) = b")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("batch size b")
    ax.set_ylabel("throughput multiplier s(b)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
