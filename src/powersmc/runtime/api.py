"""The library's entry points: every method run on a fresh `Scheduler` (`runtime.scheduler`).

Power-SMC (Algorithm 1): N particles in one batched decode, exact weights, ESS resampling.
Algorithm 1 is written once, per particle system, in `methods.system`; the `Scheduler` runs any
number of systems (and every other method's programs) in one batch that re-forms at every
token; it drives a `ParticleEngine` (`backends.engine`) that draws one token per live row
and applies ancestor indices. Backends that return log-probabilities (Transformers, llama.cpp,
toy models) are served by `LMParticles`; an engine that samples tokens itself (vLLM)
implements the interface natively.

Hot-path design (one decode step, all on the engine's device):
  * one batched forward over the live particles of every system; finished particles have left
    the batch (App. D);
  * sampling, log-weights (eq. 8), ESS (eq. 6) and the would-be ancestors are computed on the
    device; a single host transfer per step brings back every system's (resample flag,
    ancestors, finished);
  * the engine reindexes its state only when resampling fired or a particle finished, and only
    for rows that change (App. C, `backends.kvcache`);
  * token ids stay in a per-system [N, T] device tensor; text is decoded once, at the end.

`order='adapted'` is the fully adapted order of auxiliary particle filters: under the default
proposal the incremental weight log Z_t depends on the prefix only, so resampling can come
before the draw and copies of a particle draw their own next tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.bon import bon_program
from powersmc.methods.common import make_generator
from powersmc.methods.decoding import decode_program
from powersmc.methods.mh import mh_program
from powersmc.methods.program import Program
from powersmc.methods.registry import method_program
from powersmc.methods.selection import AnswerKey
from powersmc.methods.smc import system_seed
from powersmc.methods.spower import spower_program
from powersmc.proposals import Proposal
from powersmc.results import ImportanceResult, SampleResult, SMCResult
from powersmc.runtime.scheduler import Scheduler
from powersmc.schedules import Schedule


def smc_sample(model: LanguageModel, prompt: Prompt, **options) -> SMCResult:
    """Draw one answer from pi_alpha(y|x) proportional to p(y|x)^alpha with Power-SMC.

    `prompt` is text for text models, a list of token ids for `FunctionLM`. The options are
    those of `smc_sample_many`, which runs this as a batch of one prompt.
    """
    return smc_sample_many(model, [prompt], **options)[0]


def smc_sample_many(
    model: LanguageModel,
    prompts: Sequence[Prompt],
    *,
    alpha: float = 4.0,
    particles: int = 16,
    ess_threshold: float = 0.5,
    resampler: str = "systematic",
    ramp_tokens: int = 0,
    alpha_schedule: Schedule | Sequence[float] | None = None,
    max_new_tokens: int = 512,
    seed: int | None = None,
    tau: float | None = None,
    proposal: Proposal | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    progress: bool = False,
    rounds: int = 1,
    select: str = "sample",
    key: AnswerKey | None = None,
    order: str = "standard",
    resample_align: int | str = "block",
) -> list[SMCResult]:
    """Power-SMC for P prompts in one batch of P x N particles: one answer per prompt.

    Each prompt is its own particle system (Algorithm 1): weights, ESS, resampling decisions
    and the evidence estimate never mix across prompts, so every answer is distributed exactly
    as with `smc_sample` on that prompt alone. The batch only shares the forward passes,
    which raises throughput wherever s(P*N) > P*s(N) (Sec. 6, Lemma 1).

    Args:
        model: any `LanguageModel` backend (`load_model(...)`, `FunctionLM(...)`).
        prompts: texts for text models, lists of token ids for `FunctionLM`.
        alpha: the power exponent, >= 1.
        particles: N, the number of particles per prompt.
        ess_threshold: kappa; resample a prompt's system when its ESS < kappa * N.
        resampler: 'systematic' (default), 'multinomial', 'stratified', 'residual' or
            'chopthin' (Gandy & Lau 2016; not equally weighted afterwards, see `chopthin`).
        ramp_tokens: exact alpha-ramping, linear over this many tokens (0: off; paper: 100).
        alpha_schedule: a user schedule t -> alpha_t (or a list alpha_1, alpha_2, ...); the
            bridge of App. B keeps the final target p^alpha whatever the schedule.
        max_new_tokens: T_max. Particles still running at T_max are kept as truncated
            sequences: the target is then p(y)^alpha over EOS-terminated sequences of length
            <= T_max together with unfinished prefixes of length exactly T_max.
        seed: makes the run bit-reproducible on CPU; None draws one. Prompt k's system has
            its own generator, seeded with `seed` for k = 0 and a derived seed otherwise
            (`scheduler.system_seed`, recorded in its result), so its answer does not depend
            on the other prompts (bit-identical on batch-invariant models; on real backends a
            batched forward may differ from a solo one in the last float bits).
        tau: fixed proposal temperature; default 1/alpha_t (Theorem 1).
        proposal: any prefix-only proposal `(logp, alpha_t) -> logq`; overrides `tau`.
        top_k, top_p: truncate the MODEL (warned): the target becomes the truncated model's
            power, and weights are exact for that truncated target.
        progress: show a progress bar on stderr.
        rounds: R independent particle systems per prompt (one batch of P*R*N rows); the answer
            is drawn with probability proportional to each round's Z_hat times its particle
            weights, and log_z is the mean of the rounds' Z_hat (`methods.selection`).
        select: 'sample' (default: draw one particle, Algorithm 1 line 23) or 'vote' (the
            answer with the largest total normalised weight, answers compared by `key`).
        key: text -> answer (None: no answer) for select='vote'; default the text itself.
        order: 'standard' (Algorithm 1: draw, weight, resample) or 'adapted' (the fully
            adapted order of auxiliary particle filters: under the default proposal the weight
            of step t, log Z_t, depends on the prefix only, so the system is reweighted and
            resampled before the token is drawn, and copies of one particle draw independent
            tokens instead of sharing one). Same forward passes; needs tau = proposal = None.
        resample_align: B; a system whose ESS fell below kappa * N resamples at the first step
            at which its sequences' length (prompt + generated) is 1 mod B, not at once
            (1: at once, Algorithm 1). Any rule that decides from the past is a valid SMC
            schedule: the target, the weights and the evidence's unbiasedness are unchanged;
            the particles only stay unbalanced for up to B - 1 more steps. 'block' (the
            default) takes the engine's `fork_block`: 1 on llama.cpp, Transformers and
            FunctionLM, where a row is copied with its cache (so the default is Algorithm 1
            there); on vLLM, whose prefix cache reuses whole KV blocks only, the block, where a
            copy recomputes one token instead of up to a block (on CPU, N = 16 and T = 256 went
            from 1.6x vLLM's own sampling of 16 sequences to 0.96x; what the deferral costs in
            TV to pi_alpha at equal N on toy LMs: docs/benchmarks.md).

    Cost per result: `token_evals`, `prefill_tokens` and `forward_passes` are that system's
    own; `seconds` runs from its admission to its last token. The systems run through one
    `Scheduler`: a backend with bounded room (llama.cpp: contexts of 256 rows, at most three
    alive) admits the next system as soon as one finishes.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise InputError("prompts", "a non-empty list of prompts", prompts)
    _, seed = make_generator(seed, model.device)
    sched = Scheduler(model, progress=progress)
    options: dict[str, Any] = dict(alpha=alpha, particles=particles, ess_threshold=ess_threshold,
                   resampler=resampler, ramp_tokens=ramp_tokens, alpha_schedule=alpha_schedule,
                   max_new_tokens=max_new_tokens, tau=tau, proposal=proposal, top_k=top_k,
                   top_p=top_p, order=order, resample_align=resample_align, rounds=rounds,
                   select=select, key=key)
    try:
        handles = [sched.submit(p, seed=system_seed(seed, k), **options)
                   for k, p in enumerate(prompts)]
        sched.run()
    finally:
        sched.close()
    return [_smc(h.result()) for h in handles]


def _smc(result: object) -> SMCResult:
    assert isinstance(result, SMCResult)
    return result


def run_program(model: LanguageModel, program: Program) -> SampleResult:
    """Run one program alone on a fresh `Scheduler`."""
    return run_programs(model, [program])[0]


def run_programs(model: LanguageModel, programs: Iterable[Program], *,
                 progress: bool = False) -> list[SampleResult]:
    """Run programs together on a fresh `Scheduler`, sharing its forward passes; their
    results in order."""
    sched = Scheduler(model, progress=progress)
    try:
        handles = [sched.start(p) for p in programs]
        sched.run()
    finally:
        sched.close()
    return [h.result() for h in handles]


def run_method(name: str, model: LanguageModel, prompt: Prompt, *, alpha: float,
               max_new_tokens: int, seed: int | None, **options: Any) -> SampleResult:
    """Run method `name` alone (`methods.registry.method_program`)."""
    return run_program(model, method_program(name, model, prompt, alpha=alpha,
                                             max_new_tokens=max_new_tokens, seed=seed,
                                             **options))


def mh_sample(model: LanguageModel, prompt: Prompt, **options: Any) -> SampleResult:
    """One MH answer (`methods.mh.mh_program`'s options), run alone."""
    return run_program(model, mh_program(model, prompt, **options))


def scalable_power_sample(model: LanguageModel, prompt: Prompt, **options: Any) -> SampleResult:
    """One Scalable Power Sampling answer (`methods.spower.spower_program`'s options)."""
    return run_program(model, spower_program(model, prompt, **options))


def bon_sample(model: LanguageModel, prompt: Prompt, **options: Any) -> ImportanceResult:
    """One importance-resampled best-of-N answer (`methods.bon.bon_program`'s options)."""
    result = run_program(model, bon_program(model, prompt, **options))
    assert isinstance(result, ImportanceResult)
    return result


def sample(model: LanguageModel, prompt: Prompt, **options: Any) -> SampleResult:
    """`num_samples` decoded answers (`methods.decoding.decode_program`'s options)."""
    return run_program(model, decode_program(model, prompt, **options))
