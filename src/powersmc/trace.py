"""`powersmc sample --trace FILE.png`: one run drawn from its result's diagnostics.

The Power-SMC family (smc, smc-adapted, smc-rm, ccps): the ESS after every token (eq. 6) with
the resampling events; the MH family (mh, ecmh and their faithful modes): the acceptance rate
of each block's moves; PPT: the swap acceptance of every adjacent pair of rungs and the move
acceptance of every rung.
"""

from __future__ import annotations

from pathlib import Path

from powersmc.errors import InputError
from powersmc.results import SampleResult, SMCResult

TRACED = ("smc", "smc-adapted", "smc-rm", "ccps", "mh", "mh-faithful", "ecmh", "ecmh-faithful",
          "ppt")
"""The methods whose runs `plot_trace` draws."""


def check_trace(method: str) -> None:
    if method not in TRACED:
        raise InputError("--trace", f"a method with a run to draw ({', '.join(TRACED)})",
                         method)


def plot_trace(result: SampleResult, path: str | Path) -> None:
    """Draw `result`'s run into `path` (a PNG); raises `InputError` naming --trace for a
    method with nothing to draw (decoding, best-of-N, maj, Scalable Power Sampling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result.stats
    if isinstance(result, SMCResult) and result.ess:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(range(1, len(result.ess) + 1), result.ess, lw=1.2, label="ESS")
        for k, t in enumerate(result.resample_steps):
            ax.axvline(t, color="tab:red", alpha=0.35, lw=0.8,
                       label="resampling" if k == 0 else None)
        ax.set_xlabel("token t")
        ax.set_ylabel(f"ESS (N = {result.num_particles})")
        ax.set_ylim(0, result.num_particles * 1.05)
        ax.legend(loc="lower left", fontsize=8)
    elif "block_acceptance" in st:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        rates = [float("nan") if r is None else r for r in st["block_acceptance"]]
        ax.bar(range(1, len(rates) + 1), rates)
        ax.set_xlabel(f"block (B = {st['block_size']} tokens, {st['mh_moves']} moves each)")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1)
    elif "swap_acceptance" in st:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        a = st["alphas"]
        pairs = [f"{x:.2g}-{y:.2g}" for x, y in zip(a, a[1:], strict=False)]
        nan = float("nan")
        left.bar(pairs, [nan if r is None else r for r in st["swap_acceptance"]])
        left.set_xlabel("adjacent rungs (alpha)")
        left.set_ylabel("swap acceptance")
        left.set_ylim(0, 1)
        right.bar([f"{x:.2g}" for x in a], [nan if r is None else r
                                             for r in st["move_acceptance"]])
        right.set_xlabel("rung (alpha)")
        right.set_ylabel("move acceptance")
        right.set_ylim(0, 1)
    else:
        raise InputError("--trace", f"a method with a run to draw ({', '.join(TRACED)})",
                         result.method)
    fig.suptitle(f"{result.method}: {result.text[:60]!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
