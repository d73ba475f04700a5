"""A request as particle systems of the `Scheduler`, so that every method but MH and Scalable
Power Sampling joins the running batch at the next token.

- Power-SMC (`smc`, `smc-adapted`): n systems per prompt, Algorithm 1 with the request's
  options; each answer is properly weighted for pi_alpha.
- Best-of-N (`bon`): n systems per prompt of N = `particles` rows drawn from p itself
  (tau = 1) that never resample (`ess_threshold=0`). Each particle's weight is then
  alpha log p(y) - log p(y) = (alpha - 1) log p(y), and the system's final draw picks one in
  proportion to it: exactly `bon_sample` (importance-resampled best-of-N, eq. 4-5).
- Decoding (`plain`, `lowtemp`, `greedy`): one system per prompt whose n rows are the n
  answers, never resampled, so each row is an independent draw of the decoder: plain at the
  request's temperature (its top-k / top-p nucleus after the temperature, as the library's
  `plain_sample`; temperature 0 is greedy), low temperature at tau = 1/alpha, greedy by
  `ArgmaxProposal`. The last two need a proposal callable: on vLLM, whose processors draw
  the tokens, greedy and top-k / top-p requests run whole between steps instead.

A seeded request's k-th system is seeded `system_seed(seed, k)`, as `smc_sample_many` seeds
its k-th prompt, so it reproduces whatever shares the batch (up to the last float bits of a
batched forward on real backends).
"""

from __future__ import annotations

from typing import Any

from powersmc.methods.registry import smc_options
from powersmc.methods.scheduler import system_seed
from powersmc.proposals import ArgmaxProposal, NucleusProposal
from powersmc.server.jobs import Job

DECODING = ("plain", "lowtemp", "greedy")
SCHEDULED = ("smc", "smc-adapted", "bon") + DECODING
"""Methods whose requests join the scheduler's batch; the others run whole between steps."""


def runs_whole(job: Job, *, proposals: bool) -> bool:
    """Whether the job runs whole between steps instead of as systems: MH and Scalable Power
    Sampling, and greedy / top-k / top-p decoding on an engine that takes no proposal
    callable (vLLM: `proposals` False)."""
    return job.method not in SCHEDULED or (
        not proposals and job.method in DECODING and "proposal" in _decoding(job))


def systems(job: Job, ids: list[list[int]]) -> list[tuple[list[int], dict[str, Any]]]:
    """(prompt ids, `Scheduler.submit` keyword arguments) of each of the job's systems, in the
    order its answers are returned (prompt-major)."""
    m = job.method
    if m in DECODING:
        opts, prompts = _decoding(job), ids
    else:
        prompts = [p for p in ids for _ in range(job.n)]
        if m == "bon":
            opts = dict(alpha=job.alpha, particles=job.options["particles"], tau=1.0,
                        ess_threshold=0.0)
        else:
            opts = dict(smc_options(job.options), alpha=job.alpha)
            if m == "smc-adapted":
                opts["order"] = "adapted"
    return [(p, dict(opts, max_new_tokens=job.max_tokens,
                     seed=None if job.seed is None else system_seed(job.seed, k)))
            for k, p in enumerate(prompts)]


def _decoding(job: Job) -> dict[str, Any]:
    """One system of n never-resampled rows drawing the decoder's tokens."""
    base: dict[str, Any] = dict(particles=job.n, ess_threshold=0.0, alpha=1.0)
    if job.method == "lowtemp":  # the default proposal at alpha: tau = 1/alpha (eq. 3)
        return base | {"alpha": job.alpha}
    t = float(job.options.get("temperature", 1.0))
    top_k, top_p = job.options.get("top_k"), job.options.get("top_p")
    if job.method == "greedy" or t == 0:
        return base | {"proposal": ArgmaxProposal()}
    if top_k is not None or (top_p is not None and top_p < 1):
        return base | {"proposal": NucleusProposal(t, top_k=top_k, top_p=top_p)}
    return base | ({} if t == 1 else {"tau": t})
