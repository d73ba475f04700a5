"""`powersmc report DIR`: the paper's Table 1 from a results file, and an accuracy-latency plot.

Accuracy is pass@1 over all (problem, seed) results with a 95% Wilson interval. Latency is
relative to the baseline method ('plain' if present, else the first method) in the same run:
the median of per-(problem, seed) ratios and the ratio of total wall-clock times, each with a
95% paired bootstrap interval. With several seeds, pass@k (unbiased estimator of Chen et al.
2021) is reported for k = 1..#seeds. Every pair of methods is compared on their common
(problem, seed) results: exact McNemar test and a paired bootstrap interval of the accuracy
difference (`eval.paired`). Results that carry a weighted vote (`voted_correct`: Power-SMC,
best-of-N) also count as their own method 'NAME (vote)', with the same latency. Units that
failed on Ray workers and have no result yet are listed at the end, with their last error.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from powersmc.errors import InputError
from powersmc.eval.labels import dataset_label, model_label
from powersmc.eval.paired import compare, latency_ratios
from powersmc.eval.store import CONFIG, FAILURES, RESULTS, key_of, read_results

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


VOTE = " (vote)"


def with_votes(results: list[dict], methods: list[str]) -> tuple[list[dict], list[str]]:
    """Add a 'NAME (vote)' result for every result graded on its weighted vote too (rows
    written before the vote existed have none, and report as before)."""
    votes = [{**r, "method": r["method"] + VOTE, "answer": r["voted_answer"],
              "extracted": r["voted_extracted"], "correct": r["voted_correct"],
              "correct_math_verify": r["voted_correct_math_verify"]}
             for r in results if "voted_correct" in r]
    voted = {r["method"] for r in votes}
    order = [x for m in methods for x in (m, m + VOTE) if x == m or x in voted]
    return results + votes, order


def summarize(results: list[dict], methods: list[str]) -> list[dict]:
    by: defaultdict[str, dict[tuple[str, int], dict]] = defaultdict(dict)
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
        timed = sorted(k for k, b in by[base].items() if k in by[m] and b["seconds"] > 0)
        lat = latency_ratios([by[m][k]["seconds"] for k in timed],
                             [by[base][k]["seconds"] for k in timed], timed) if timed else {}
        per_problem = defaultdict(list)
        for r in rs:
            per_problem[r["problem_id"]].append(r["correct"])
        n_seeds = min(len(v) for v in per_problem.values())
        passk = {kk: sum(pass_at_k(len(v), sum(v), kk) for v in per_problem.values())
                 / len(per_problem) for kk in range(1, n_seeds + 1)}
        rows.append({
            "method": m, "n": len(rs), "accuracy": k / len(rs), "ci95": wilson(k, len(rs)),
            "accuracy_math_verify": (sum(mv) / len(mv)) if mv else None,
            "latency_median_ratio": lat.get("median"),
            "latency_median_ci95": lat.get("median_ci95"),
            "latency_total_ratio": lat.get("total"),
            "latency_total_ci95": lat.get("total_ci95"),
            "mean_tokens": sum(r["generated_tokens"] for r in rs) / len(rs),
            "mean_token_evals": sum(r["token_evals"] for r in rs) / len(rs),
            "mean_forward_passes": sum(r.get("forward_passes", 0) for r in rs) / len(rs),
            "mean_seconds": sum(r["seconds"] for r in rs) / len(rs),
            "pass_at_k": passk, "baseline": base,
            "grading_errors": sum(bool(r.get("grading_error")) for r in rs),
            "paired": {o: c for o in methods if o != m and by[o]
                       and (c := compare(by[m], by[o])) is not None},
        })
    return rows


def _fmt(x, spec=".2f", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def _ratio(x, ci) -> str:
    """'1.64× (1.50–1.80)': a latency ratio and its bootstrap interval."""
    if x is None:
        return "—"
    return f"{x:.2f}×" + ("" if ci is None else f" ({ci[0]:.2f}–{ci[1]:.2f})")


def _paired_table(rows: list[dict]) -> list[str]:
    """Each unordered pair of methods once: McNemar and the accuracy difference A - B."""
    lines = ["## Paired comparisons", "",
             "Same problems and seeds. Exact McNemar test on the discordant pairs; accuracy "
             "difference A − B with a 95% paired bootstrap interval (problems resampled, "
             "2000 resamples, seed 0).", "",
             "| A | B | pairs | only A right | only B right | McNemar p | A − B (pts) | 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    order = [r["method"] for r in rows]
    for r in rows:
        for other, c in r["paired"].items():
            if order.index(other) <= order.index(r["method"]):
                continue
            lo, hi = c["ci95"]
            lines.append(
                f"| {r['method']} | {other} | {c['n']} | {c['a_only']} | {c['b_only']} | "
                f"{c['p_value']:.3g} | {100 * c['difference']:+.1f} | "
                f"{100 * lo:+.1f} to {100 * hi:+.1f} |")
    return lines


def _batch_note(batch_prompts: int | None) -> list[str]:
    if not batch_prompts or batch_prompts < 2:
        return []
    return [f"Every method ran up to {batch_prompts} problems at once in one continuously "
            "batched scheduler (`--batch-prompts`): its seconds are each answer's own time from "
            "admission to answer, spent sharing every forward pass with the others.", ""]


def _unresolved_failures(out: Path, results: list[dict]) -> list[dict]:
    """The last failure of each (problem, method, seed) that has no result."""
    done = {key_of(r) for r in results}
    last = {key_of(f): f for f in read_results(out / FAILURES)}
    return [f for k, f in last.items() if k not in done]


def _failures_table(failed: Sequence[dict]) -> list[str]:
    if not failed:
        return []
    lines = [f"## Failed units ({len(failed)})", "",
             "No result: every attempt failed; re-running the command tries them again.", "",
             "| problem | method | seed | attempts | error |", "|---|---|---|---|---|"]
    for f in failed:
        err = str(f["error"]).replace("|", "\\|")
        lines.append(f"| {f['problem_id']} | {f['method']} | {f['seed']} | {f['attempts']} | "
                     f"{err} |")
    return [*lines, ""]


def _reference_table(rows: list[dict], ref: str) -> list[str]:
    """Every method against the reference: accuracy, compute, and the paired McNemar test."""
    lines = [f"## Against `{ref}`", "",
             "Mean token-evals and forward passes per answer, seconds per answer, and the exact "
             f"McNemar test against `{ref}` on the same problems and seeds.", "",
             "| Method | Accuracy (%) | Token evals | Forward passes | s / answer | "
             f"only it right | only {ref} right | McNemar p |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["paired"].get(ref)
        tail = ("— | — | —" if c is None else
                f"{c['a_only']} | {c['b_only']} | {c['p_value']:.3g}")
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f} | "
                     f"{r['mean_token_evals']:.0f} | {r['mean_forward_passes']:.0f} | "
                     f"{r['mean_seconds']:.2f} | {tail} |")
    return [*lines, ""]


def markdown(rows: list[dict], results: list[dict], title: str,
             failed: Sequence[dict] = (), batch_prompts: int | None = None,
             reference: str | None = None, budget: dict | None = None) -> str:
    lines = [f"# {title}", "",
             *_budget_note(budget),
             f"Latency is relative to `{rows[0]['baseline']}` decoding in the same run "
             "(median of per-problem ratios; ratio of totals), with 95% paired bootstrap "
             "intervals.", "",
             *_batch_note(batch_prompts),
             "| Method | Accuracy (%) | 95% CI | math-verify (%) | Latency (median) | "
             "Latency (total) | Tokens | Token evals | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        mv = None if r["accuracy_math_verify"] is None else 100 * r["accuracy_math_verify"]
        lines.append(
            f"| {r['method']} | {100 * r['accuracy']:.1f} | {100 * lo:.1f}–{100 * hi:.1f} | "
            f"{_fmt(mv, '.1f')} | {_ratio(r['latency_median_ratio'], r['latency_median_ci95'])} "
            f"| {_ratio(r['latency_total_ratio'], r['latency_total_ci95'])} | "
            f"{r['mean_tokens']:.0f} | {r['mean_token_evals']:.0f} | {r['n']} |")
    if any(len(r["pass_at_k"]) > 1 for r in rows):
        ks = sorted(set().union(*(r["pass_at_k"] for r in rows)))
        lines += ["", "| Method | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for r in rows:
            lines.append(f"| {r['method']} | " + " | ".join(
                _fmt(100 * r["pass_at_k"][k], ".1f") if k in r["pass_at_k"] else "—"
                for k in ks) + " |")
    if reference is not None and len(rows) > 1:
        lines += ["", *_reference_table(rows, reference)]
    if len(rows) > 1:
        lines += ["", *_paired_table(rows)]
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
    lines += ["", f"Grading exceptions (graded wrong): {errors}", "", *_failures_table(failed)]
    return "\n".join(lines)


def _budget_note(budget: dict | None) -> list[str]:
    if not budget:
        return []
    knobs = ", ".join(f"{m}: {k}={v}" for m, kv in budget["knobs"].items()
                      for k, v in kv.items())
    return [f"Equal compute (`--budget {budget['particles']}`): each method's knob set for "
            f"Power-SMC's {budget['target']:.0f} mean token-evals per problem with "
            f"N = {budget['particles']}, calibrated on {len(budget['problems'])} problems: "
            f"{knobs}.", ""]


def plot_compute(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against mean token-evals and against seconds per answer, one point per
    method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, field, label in ((axes[0], "mean_token_evals", "mean token evaluations per answer"),
                             (axes[1], "mean_seconds", "seconds per answer")):
        for r in rows:
            if r["method"].endswith(VOTE):
                continue
            lo, hi = r["ci95"]
            y, x = 100 * r["accuracy"], r[field]
            ax.errorbar(x, y, yerr=[[max(0.0, y - 100 * lo)], [max(0.0, 100 * hi - y)]],
                        fmt="o", capsize=4)
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(6, 4))
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out_dir: str | Path, reference: str | None = None) -> str:
    """Write report.md, summary.json, accuracy_latency.png and accuracy_compute.png into
    out_dir; return the table. `reference`: a method every other is tested against (default:
    smc when it ran)."""
    out = Path(out_dir)
    if not (out / RESULTS).exists():
        raise InputError("DIR", f"a run directory containing {RESULTS}", str(out))
    results = read_results(out / RESULTS)
    if not results:
        raise InputError("DIR", "a run directory with at least one result", str(out))
    failed = _unresolved_failures(out, results)
    cfg = json.loads((out / CONFIG).read_text()) if (out / CONFIG).exists() else {}
    methods = cfg.get("methods") or sorted({r["method"] for r in results})
    if reference is not None and reference not in methods:
        raise InputError("--reference", f"one of the run's methods ({', '.join(methods)})",
                         reference)
    if reference is None and "smc" in methods:
        reference = "smc"
    results, methods = with_votes(results, methods)
    rows = summarize(results, methods)
    dataset, model = dataset_label(cfg.get("dataset", out.name)), model_label(cfg.get("model"))
    title = f"{dataset} — {model}, alpha={cfg.get('alpha')}"
    text = markdown(rows, results, title, failed, cfg.get("batch_prompts"), reference,
                    cfg.get("budget"))
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "accuracy_latency.png", title)
    plot_compute(rows, out / "accuracy_compute.png", title)
    return text
