"""`powersmc report DIR`: the paper's Table 1 from a results file, and an accuracy-latency plot.

Accuracy is pass@1 over all (problem, seed) results with a 95% Wilson interval. Latency is
relative to the baseline method ('plain' if present, else the first method) in the same run:
the median of per-(problem, seed) ratios and the ratio of total wall-clock times. With several
seeds, pass@k (unbiased estimator of Chen et al. 2021) is reported for k = 1..#seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import median

from powersmc.errors import InputError
from powersmc.eval.runner import CONFIG, RESULTS, read_results

Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + Z95**2 / n
    c = (p + Z95**2 / (2 * n)) / d
    h = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(results: list[dict], methods: list[str]) -> list[dict]:
    by = defaultdict(dict)
    for r in results:
        by[r["method"]][(r["problem_id"], r["seed"])] = r
    base = "plain" if "plain" in by else methods[0]
    rows = []
    for m in methods:
        rs = list(by[m].values())
        if not rs:
            continue
        k = sum(r["correct"] for r in rs)
        mv = [r["correct_math_verify"] for r in rs if r["correct_math_verify"] is not None]
        ratios, tot_m, tot_b = [], 0.0, 0.0
        for key, r in by[m].items():
            b = by[base].get(key)
            if b is not None and b["seconds"] > 0:
                ratios.append(r["seconds"] / b["seconds"])
                tot_m, tot_b = tot_m + r["seconds"], tot_b + b["seconds"]
        per_problem = defaultdict(list)
        for r in rs:
            per_problem[r["problem_id"]].append(r["correct"])
        n_seeds = min(len(v) for v in per_problem.values())
        passk = {kk: sum(pass_at_k(len(v), sum(v), kk) for v in per_problem.values())
                 / len(per_problem) for kk in range(1, n_seeds + 1)}
        rows.append({
            "method": m, "n": len(rs), "accuracy": k / len(rs), "ci95": wilson(k, len(rs)),
            "accuracy_math_verify": (sum(mv) / len(mv)) if mv else None,
            "latency_median_ratio": median(ratios) if ratios else None,
            "latency_total_ratio": tot_m / tot_b if tot_b else None,
            "mean_tokens": sum(r["generated_tokens"] for r in rs) / len(rs),
            "mean_token_evals": sum(r["token_evals"] for r in rs) / len(rs),
            "mean_seconds": sum(r["seconds"] for r in rs) / len(rs),
            "pass_at_k": passk, "baseline": base,
            "grading_errors": sum(bool(r.get("grading_error")) for r in rs),
        })
    return rows


def _fmt(x, spec=".2f", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def _batch_note(results: list[dict]) -> list[str]:
    sizes = [len(r["batch_problems"]) for r in results if "batch_problems" in r]
    if not sizes:
        return []
    return [f"Power-SMC ran up to {max(sizes)} problems per batch (`--batch-prompts`): its "
            "seconds are the batch's divided by its problems, a throughput figure, not "
            "single-answer latency.", ""]


def markdown(rows: list[dict], results: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             f"Latency is relative to `{rows[0]['baseline']}` decoding in the same run "
             "(median of per-problem ratios; ratio of totals).", "",
             *_batch_note(results),
             "| Method | Accuracy (%) | 95% CI | math-verify (%) | Latency (median) | "
             "Latency (total) | Tokens | Token evals | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        mv = None if r["accuracy_math_verify"] is None else 100 * r["accuracy_math_verify"]
        lines.append(
            f"| {r['method']} | {100 * r['accuracy']:.1f} | {100 * lo:.1f}–{100 * hi:.1f} | "
            f"{_fmt(mv, '.1f')} | {_fmt(r['latency_median_ratio'], '.2f', '×')} | "
            f"{_fmt(r['latency_total_ratio'], '.2f', '×')} | {r['mean_tokens']:.0f} | "
            f"{r['mean_token_evals']:.0f} | {r['n']} |")
    if any(len(r["pass_at_k"]) > 1 for r in rows):
        ks = sorted(set().union(*(r["pass_at_k"] for r in rows)))
        lines += ["", "| Method | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for r in rows:
            lines.append(f"| {r['method']} | " + " | ".join(
                _fmt(100 * r["pass_at_k"][k], ".1f") if k in r["pass_at_k"] else "—"
                for k in ks) + " |")
    dis = [r for r in results
           if r["correct_math_verify"] is not None and r["correct_math_verify"] != r["correct"]]
    lines += ["", f"## Grader disagreements ({len(dis)})", ""]
    if dis:
        lines += ["| problem | method | seed | reference | extracted | ours | math-verify |",
                  "|---|---|---|---|---|---|---|"]
        for r in dis:
            ext = str(r["extracted"]).replace("|", "\\|")
            ref = str(r["reference"]).replace("|", "\\|")
            lines.append(f"| {r['problem_id']} | {r['method']} | {r['seed']} | {ref} | {ext} | "
                         f"{r['correct']} | {r['correct_math_verify']} |")
    errors = sum(bool(r.get("grading_error")) for r in results)
    lines += ["", f"Grading exceptions (graded wrong): {errors}", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        x = r["latency_median_ratio"] or float("nan")
        lo, hi = r["ci95"]
        y = 100 * r["accuracy"]
        err = [[max(0.0, y - 100 * lo)], [max(0.0, 100 * hi - y)]]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=4)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"latency relative to {rows[0]['baseline']} (median ratio, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out_dir: str | Path) -> str:
    """Write report.md, summary.json and accuracy_latency.png into out_dir; return the table."""
    out = Path(out_dir)
    if not (out / RESULTS).exists():
        raise InputError("DIR", f"a run directory containing {RESULTS}", str(out))
    results = read_results(out / RESULTS)
    if not results:
        raise InputError("DIR", "a run directory with at least one result", str(out))
    cfg = json.loads((out / CONFIG).read_text()) if (out / CONFIG).exists() else {}
    methods = cfg.get("methods") or sorted({r["method"] for r in results})
    rows = summarize(results, methods)
    dataset, model = cfg.get("dataset", out.name), str(cfg.get("model", ""))
    title = f"{dataset} — {model}, alpha={cfg.get('alpha')}"
    text = markdown(rows, results, title)
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    short = f"{Path(dataset).name} — {Path(model).name}, alpha={cfg.get('alpha')}"
    plot(rows, out / "accuracy_latency.png", short)  # paths shortened so the title fits
    return text
