"""Power-SMC (Algorithm 1): N particles in one batched decode, exact weights, ESS resampling.

Written once for every engine: the loop keeps the weights, ESS, resampling decisions,
alpha-bridge, evidence and diagnostics, and drives a `ParticleEngine` (`backends.particles`)
that draws one token per live particle and applies ancestor indices. Backends that return
log-probabilities (Transformers, llama.cpp, toy models) are served by `LMParticles`; an engine
that samples tokens itself (vLLM) implements the interface natively.

Hot-path design (one decode step, all on the engine's device):
  * one batched forward over the live particles; finished particles have left the batch (App. D);
  * sampling, log-weights (eq. 8), ESS (eq. 6) and the would-be ancestors are computed on the
    device; a single host transfer per step brings back (resample flag, ancestors, finished);
  * the engine reindexes its state only when resampling fired or a particle finished, and only
    for rows that change (App. C, `backends.kvcache`);
  * token ids stay in an [P*N, T] device tensor; text is decoded once, at the end.

Several prompts share one batch (`smc_sample_many`): prompt p owns particles p*N .. p*N+N-1,
with its own weights, ESS, resampling and evidence; only the forward pass is shared.

`order='adapted'` is the fully adapted order of auxiliary particle filters: under the default
proposal the incremental weight log Z_t depends on the prefix only, so resampling can come
before the draw and copies of a particle draw their own next tokens (`_redraw`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from powersmc.backends.particles import Draw, ParticleEngine, particle_engine
from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import DegenerateWeightsError, InputError
from powersmc.methods.common import (
    check_alpha,
    check_ess_threshold,
    check_nonnegative_int,
    check_positive_int,
    encode_prompt,
    eos_tensor,
    make_generator,
)
from powersmc.methods.selection import AnswerKey, check_select, finish
from powersmc.proposals import Proposal, check_truncation
from powersmc.resampling import get_resampler
from powersmc.results import Cost, Particle, SMCResult
from powersmc.schedules import Schedule, make_schedule
from powersmc.weights import ess, log_mean_weight

ORDERS = ("standard", "adapted")


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise InputError("order", f"one of {', '.join(ORDERS)}", order)
    return order


def check_resample_align(align: int | str, name: str = "resample_align") -> int | str:
    if align == "block" or (isinstance(align, int) and not isinstance(align, bool)
                            and align >= 1):
        return align
    raise InputError(name, "a positive integer or 'block' (the engine's KV block)", align)


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
    resample_align: int | str = 1,
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
        seed: makes the run bit-reproducible on CPU; None draws one (recorded in the results).
            One generator drives the whole batch, so a result depends on the batch it ran in.
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
            the particles only stay unbalanced for up to B - 1 more steps. 'block' takes the
            engine's `fork_block`: on vLLM, whose prefix cache reuses whole KV blocks only, a
            copy made at such a step recomputes one token instead of up to a block (on CPU,
            where recomputation is as dear as decoding, N = 16 and T = 256 went from 1.6x
            vLLM's own sampling of 16 sequences to 0.96x, docs/benchmarks.md); elsewhere 1.

    Cost per result: `token_evals` and `prefill_tokens` are that prompt's own; `seconds` and
    `forward_passes` are the batch's (the answer is ready when the batch is). A backend with a
    row limit (`max_rows`, llama.cpp) runs the P * rounds systems in consecutive batches of as
    many whole systems as fit.
    """
    alpha = check_alpha(alpha)
    n = check_positive_int("particles", particles)
    kappa = check_ess_threshold(ess_threshold)
    check_nonnegative_int("ramp_tokens", ramp_tokens)
    check_positive_int("rounds", rounds)
    check_select(select)
    adapted = check_order(order) == "adapted"
    check_resample_align(resample_align)
    resample = get_resampler(resampler)
    check_truncation(top_k, top_p)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise InputError("prompts", "a non-empty list of prompts", prompts)
    prompt_ids = [encode_prompt(model, p, max_new_tokens) for p in prompts for _ in range(rounds)]
    gen, seed = make_generator(seed, model.device)
    schedule = make_schedule(alpha, ramp_tokens, alpha_schedule)

    engine = particle_engine(model, gen, tau=tau, proposal=proposal, top_k=top_k, top_p=top_p)
    if adapted and not engine.adaptable:
        raise InputError("order", "'standard' when tau or proposal is set (the adapted order "
                         "needs the default proposal, whose weight depends on the prefix only)",
                         order)

    align = engine.fork_block if isinstance(resample_align, str) else resample_align  # "block"

    # as many whole particle systems per batch as the engine holds rows (llama.cpp: 255);
    # the rest run after them on the same generator, each system still an exact run
    limit = getattr(model, "max_rows", None) or len(prompt_ids) * n
    if n > limit:
        raise InputError("particles", f"at most {limit} on this backend", n)
    per = limit // n
    results = []
    for lo in range(0, len(prompt_ids), per):
        results += _systems(model, engine, prompt_ids[lo : lo + per], n=n, kappa=kappa,
                            resample=resample, schedule=schedule, alpha=alpha,
                            adapted=adapted, align=align, gen=gen, seed=seed,
                            T=max_new_tokens, progress=progress)
    return finish(results, rounds, select, key, gen)


def _systems(model: LanguageModel, engine: ParticleEngine, prompt_ids: list[list[int]], *,
             n: int, kappa: float, resample, schedule: Schedule, alpha: float, adapted: bool,
             align: int, gen: torch.Generator, seed: int, T: int,
             progress: bool) -> list[SMCResult]:
    """Algorithm 1 on P independent particle systems of n particles in one batch."""
    dev, P = model.device, len(prompt_ids)
    f64: dict[str, Any] = dict(dtype=torch.float64, device=dev)
    start = time.perf_counter()
    engine.start(prompt_ids, n, budget=P * n * T, redraws=adapted)
    forward_passes = 1  # the prefill

    tokens = torch.zeros((P * n, T), dtype=torch.long, device=dev)
    log_w = torch.zeros((P, n), **f64)
    flat_w = log_w.view(-1)
    log_p_seq = torch.zeros(P * n, **f64)  # log p(y_{1:t}) per particle, for the bridge
    lengths = torch.zeros(P * n, dtype=torch.long, device=dev)
    finished = torch.zeros(P * n, dtype=torch.bool, device=dev)
    ess_hist, logzt_hist = torch.zeros((P, T), **f64), torch.zeros((P, T), **f64)
    log_z = torch.zeros(P, **f64)
    eos = eos_tensor(model)
    offsets = torch.arange(P, device=dev)[:, None] * n
    identity = torch.arange(n, device=dev).expand(P, n)
    prompt_len = torch.tensor([len(p) for p in prompt_ids], device=dev)
    alive = np.arange(P * n)  # host: particle id of each batch row
    alive_dev, group_dev, sizes, sizes_dev = _live(alive, n, P, dev)
    steps = np.zeros(P, dtype=np.int64)  # last step at which each prompt had live particles
    evals = np.zeros(P, dtype=np.int64)
    resample_steps: list[list[int]] = [[] for _ in range(P)]
    alpha_prev = 1.0
    bar = tqdm(total=T, desc="power-smc", unit="tok", disable=not progress, leave=False)

    for t in range(1, T + 1):
        steps[sizes > 0] = t
        alpha_t = float(schedule(t))
        if alpha_t != alpha_prev:  # exact bridge p^{a_prev} -> p^{a_t} (Sec. 5.3, App. B)
            flat_w += (alpha_t - alpha_prev) * log_p_seq
            alpha_prev = alpha_t
        draw = engine.advance(alpha_t)  # profiled inside: powersmc.forward / powersmc.sample
        tok = draw.tokens
        flat_w.index_add_(0, alive_dev, draw.incr)  # eq. 8
        log_p_seq.index_add_(0, alive_dev, draw.logp)
        tokens[alive_dev, t - 1] = tok
        lengths[alive_dev] = t
        finished[alive_dev] = torch.isin(tok, eos)
        with record_function("powersmc.weights"):
            # eq. 13, mean over each prompt's live particles
            logzt_hist[:, t - 1] = (torch.zeros(P, **f64).index_add_(0, group_dev, draw.log_z)
                                    / sizes_dev)
            ess_t = ess(log_w)
            ess_hist[:, t - 1] = ess_t
            fire = ess_t < kappa * n
            if align > 1:  # only where a copy is cheap: length = prompt + t = 1 mod align
                fire &= (prompt_len + (t - 1)) % align == 0
            total = torch.logsumexp(log_w, -1)
            drawn = resample(torch.exp(log_w - total[:, None]), gen)
            drawn, post_w = drawn if isinstance(drawn, tuple) else (drawn, None)  # chopthin
            ancestors = (torch.where(fire[:, None], drawn, identity) + offsets).view(-1)
        with record_function("powersmc.sync"):  # the one host sync of this step
            packed = torch.cat([fire.double(), total, ancestors.double(),
                                finished.double()]).cpu().numpy()
        if not np.isfinite(packed[P : 2 * P]).all():
            raise DegenerateWeightsError("every particle has weight zero: q misses the target")
        fired = packed[:P] > 0.5
        source = packed[2 * P : 2 * P + P * n].astype(np.int64)
        fin = packed[2 * P + P * n :][source] > 0.5
        if fired.any():  # resample the systems that asked for it (Algorithm 1, lines 17-20)
            with record_function("powersmc.resample"):
                log_z += torch.where(fire, log_mean_weight(log_w), 0.0)
                tokens, log_p_seq = tokens[ancestors], log_p_seq[ancestors]
                lengths, finished = lengths[ancestors], finished[ancestors]
                if post_w is None:  # equally weighted after resampling (line 20)
                    log_w.masked_fill_(fire[:, None], 0.0)
                else:  # chopthin: its weights, on the scale of the mean reset into log_z
                    log_w.copy_(torch.where(fire[:, None], post_w, log_w))
                for g in np.flatnonzero(fired):
                    resample_steps[g].append(t)
        row_of = np.full(P * n, -1)
        row_of[alive] = np.arange(alive.size)
        last = None
        if adapted and fired.any():
            with record_function("powersmc.redraw"):
                fin, last = _redraw(engine, draw, source, row_of, t, tokens, log_p_seq,
                                    finished, eos, fin)
        new_alive = np.flatnonzero(~fin)
        index = row_of[source[new_alive]]
        bar.update(1)
        if new_alive.size == 0 or t == T:
            break
        with record_function("powersmc.reorder"):
            engine.reorder(torch.from_numpy(index).to(dev),
                           None if last is None else last[torch.from_numpy(new_alive).to(dev)])
        alive = new_alive
        alive_dev, group_dev, sizes, sizes_dev = _live(alive, n, P, dev)
        forward_passes += 1
        evals += sizes
    bar.close()

    engine.close()
    if alpha_prev != alpha:  # the ramp had not finished: bridge the rest of the way
        flat_w += (alpha - alpha_prev) * log_p_seq
    log_z += log_mean_weight(log_w)
    total = torch.logsumexp(log_w, -1, keepdim=True)
    chosen = torch.multinomial(torch.exp(log_w - total), 1, generator=gen).squeeze(1).tolist()
    seconds = time.perf_counter() - start
    lens, fin_all, lw = lengths.tolist(), finished.tolist(), flat_w.tolist()
    rows = tokens.tolist()
    results = []
    for g in range(P):
        cost = Cost(seconds=seconds, forward_passes=forward_passes,
                    token_evals=int(evals[g]), prefill_tokens=len(prompt_ids[g]))
        parts = [Particle(rows[i][: lens[i]], model.decode(rows[i][: lens[i]]), lw[i], fin_all[i])
                 for i in range(g * n, (g + 1) * n)]
        best = parts[chosen[g]]
        k = int(steps[g])
        results.append(SMCResult(
            method="smc", text=best.text, token_ids=best.token_ids, seed=seed, cost=cost,
            finished=best.finished, particles=parts, ess=ess_hist[g, :k].tolist(),
            resample_steps=resample_steps[g], log_z=float(log_z[g]),
            log_z_t=logzt_hist[g, :k].tolist(), alpha=alpha, num_particles=n,
            stats={"chosen_particle": chosen[g], "num_resamples": len(resample_steps[g]),
                   "batch_prompts": P, "resample_align": align},
        ))
    return results


def _redraw(engine: ParticleEngine, draw: Draw, source: np.ndarray, row_of: np.ndarray,
            t: int, tokens: torch.Tensor, log_p_seq: torch.Tensor, finished: torch.Tensor,
            eos: torch.Tensor, fin: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The fully adapted order's draw, after a resampling at step t (`order='adapted'`).

    The weight of step t is log Z_t(y_{<t}), a function of the prefix only, so selecting
    ancestors by it and then drawing y_t ~ q(. | y_{<t}) for every child is a valid SMC step
    for the same targets p(y_{1:t})^alpha_t: each (prefix, weight) pair is unchanged and y_t
    is drawn from the proposal given its prefix. The first copy of an ancestor keeps the token
    the ancestor drew (a draw from q independent of the selection, which never looked at it);
    every further copy draws afresh. Particles copied from one that had already finished stay
    finished. Updates tokens, log p and finished in place (particle-indexed, after
    resampling); returns the finished flags on the host and every particle's token at t.
    """
    src = row_of[source]  # the batch row of each particle's ancestor; -1: finished before t
    cand = np.flatnonzero(src >= 0)
    _, first = np.unique(src[cand], return_index=True)
    repeat = np.ones(cand.size, dtype=bool)
    repeat[first] = False
    again = cand[repeat]
    if again.size:
        dev = tokens.device
        again_dev, rows = (torch.from_numpy(a).to(dev) for a in (again, src[again]))
        fresh = engine.redraw(rows)
        log_p_seq[again_dev] += fresh.logp - draw.logp[rows]
        tokens[again_dev, t - 1] = fresh.tokens
        done = torch.isin(fresh.tokens, eos)
        finished[again_dev] = done
        fin = fin.copy()
        fin[again] = done.cpu().numpy()
    return fin, tokens[:, t - 1]


def _live(alive: np.ndarray, n: int, prompts: int, dev: torch.device):
    """Batch rows' particle ids on the device, their prompt index, and live rows per prompt
    (host counts, and on the device clamped to 1 for per-prompt means)."""
    alive_dev = torch.from_numpy(alive).to(dev)
    sizes = np.bincount(alive // n, minlength=prompts)
    sizes_dev = torch.from_numpy(np.maximum(sizes, 1)).to(dev, torch.float64)
    return alive_dev, alive_dev // n, sizes, sizes_dev
