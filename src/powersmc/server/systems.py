"""A request as programs of the `Scheduler` (`methods.program`): every method joins the
running batch at the next token.

- Decoding (`plain`, `lowtemp`, `greedy`): one program per prompt whose n rows are the n
  answers: plain at the request's temperature (its top-k / top-p nucleus after the
  temperature; temperature 0 is greedy), low temperature at tau = 1/alpha, greedy.
- Every other method (Power-SMC, best-of-N, MH, Scalable Power Sampling): n programs per
  prompt, one answer each, with the request's options.

A seeded request's k-th program is seeded `system_seed(seed, k)`, as `smc_sample_many` seeds
its k-th prompt, so it reproduces whatever shares the batch (up to the last float bits of a
batched forward on real backends).
"""

from __future__ import annotations

from powersmc.backends.protocol import LanguageModel
from powersmc.methods.program import Program
from powersmc.methods.registry import DECODING, method_program
from powersmc.methods.smc import system_seed
from powersmc.server.jobs import Job


def programs(job: Job, lm: LanguageModel, ids: list[list[int]]) -> list[Program]:
    """The job's programs, in the order its answers are returned (prompt-major)."""
    if job.method in DECODING:
        prompts, opts = ids, dict(job.options, num_samples=job.n)
    else:
        prompts, opts = [p for p in ids for _ in range(job.n)], dict(job.options)
    return [method_program(job.method, lm, p, alpha=job.alpha, max_new_tokens=job.max_tokens,
                           seed=None if job.seed is None else system_seed(job.seed, k), **opts)
            for k, p in enumerate(prompts)]
