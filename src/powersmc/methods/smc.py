"""Power-SMC (Algorithm 1): N particles in one batched decode, exact weights, ESS resampling.

Hot-path design (one decode step, all on the backend's device):
  * one batched forward over the live particles; finished particles have left the batch (App. D);
  * sampling, log-weights (eq. 8), ESS (eq. 6) and the would-be ancestors are computed on the
    device; a single host transfer per step brings back (resample flag, ancestors, finished);
  * the KV cache is reindexed only when resampling fired or a particle finished, and only for
    rows that change (App. C, `backends.kvcache`);
  * token ids stay in an [N, T] device tensor; text is decoded once, at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import DegenerateWeightsError
from powersmc.methods.common import (
    check_alpha,
    check_ess_threshold,
    check_nonnegative_int,
    check_positive_int,
    encode_prompt,
    eos_tensor,
    make_generator,
)
from powersmc.proposals import Proposal, TemperatureProposal, check_truncation, truncate_logprobs
from powersmc.resampling import get_resampler
from powersmc.results import Cost, Particle, SMCResult
from powersmc.schedules import Schedule, make_schedule
from powersmc.weights import ess, log_mean_weight, log_power_normalizer


def smc_sample(
    model: LanguageModel,
    prompt: Prompt,
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
) -> SMCResult:
    """Draw one answer from pi_alpha(y|x) proportional to p(y|x)^alpha with Power-SMC.

    Args:
        model: any `LanguageModel` backend (`load_model(...)`, `FunctionLM(...)`).
        prompt: text for text models, a list of token ids for `FunctionLM`.
        alpha: the power exponent, >= 1.
        particles: N, the number of particles advanced in one batch.
        ess_threshold: kappa; resample when ESS < kappa * N (kappa = 1: whenever ESS < N).
        resampler: 'systematic' (default), 'multinomial', 'stratified' or 'residual'.
        ramp_tokens: exact alpha-ramping, linear over this many tokens (0: off; paper: 100).
        alpha_schedule: a user schedule t -> alpha_t (or a list alpha_1, alpha_2, ...); the
            bridge of App. B keeps the final target p^alpha whatever the schedule.
        max_new_tokens: T_max. Particles still running at T_max are kept as truncated
            sequences: the target is then p(y)^alpha over EOS-terminated sequences of length
            <= T_max together with unfinished prefixes of length exactly T_max.
        seed: makes the run bit-reproducible on CPU; None draws one (recorded in the result).
        tau: fixed proposal temperature; default 1/alpha_t (Theorem 1).
        proposal: any prefix-only proposal `(logp, alpha_t) -> logq`; overrides `tau`.
        top_k, top_p: truncate the MODEL (warned): the target becomes the truncated model's
            power, and weights are exact for that truncated target.
        progress: show a progress bar on stderr.
    """
    alpha = check_alpha(alpha)
    n = check_positive_int("particles", particles)
    kappa = check_ess_threshold(ess_threshold)
    check_nonnegative_int("ramp_tokens", ramp_tokens)
    resample = get_resampler(resampler)
    truncating = check_truncation(top_k, top_p)
    prompt_ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    schedule = make_schedule(alpha, ramp_tokens, alpha_schedule)
    propose = proposal if proposal is not None else TemperatureProposal(tau)

    dev, T = model.device, max_new_tokens
    f64 = dict(dtype=torch.float64, device=dev)
    cost = Cost()
    start = time.perf_counter()
    state, logp = model.prefill(prompt_ids, n)
    cost.add_prefill(len(prompt_ids))

    tokens = torch.zeros((n, T), dtype=torch.long, device=dev)
    log_w = torch.zeros(n, **f64)
    log_p_seq = torch.zeros(n, **f64)  # log p(y_{1:t}) per particle, for the bridge
    lengths = torch.zeros(n, dtype=torch.long, device=dev)
    finished = torch.zeros(n, dtype=torch.bool, device=dev)
    ess_hist, logzt_hist = torch.zeros(T, **f64), torch.zeros(T, **f64)
    log_z = torch.zeros((), **f64)
    eos = eos_tensor(model)
    arange_n = torch.arange(n, device=dev)
    alive = np.arange(n)  # host: particle id of each batch row
    alive_dev = arange_n
    resample_steps: list[int] = []
    alpha_prev, steps = 1.0, 0
    bar = tqdm(total=T, desc="power-smc", unit="tok", disable=not progress, leave=False)

    for t in range(1, T + 1):
        steps = t
        alpha_t = float(schedule(t))
        if alpha_t != alpha_prev:  # exact bridge p^{a_prev} -> p^{a_t} (Sec. 5.3, App. B)
            log_w += (alpha_t - alpha_prev) * log_p_seq
            alpha_prev = alpha_t
        if truncating:
            logp = truncate_logprobs(logp, top_k, top_p)
        with record_function("powersmc.sample"):
            logq = propose(logp, alpha_t)
            tok = torch.multinomial(logq.exp(), 1, generator=gen).squeeze(1)
        lp = logp.gather(1, tok[:, None]).squeeze(1).double()
        lq = logq.gather(1, tok[:, None]).squeeze(1).double()
        log_w.index_add_(0, alive_dev, alpha_t * lp - lq)  # eq. 8
        log_p_seq.index_add_(0, alive_dev, lp)
        tokens[alive_dev, t - 1] = tok
        lengths[alive_dev] = t
        finished[alive_dev] = torch.isin(tok, eos)
        logzt_hist[t - 1] = log_power_normalizer(logp, alpha_t).mean()  # eq. 13
        with record_function("powersmc.weights"):
            ess_t = ess(log_w)
            ess_hist[t - 1] = ess_t
            fire = ess_t < kappa * n
            total = torch.logsumexp(log_w, 0)
            ancestors = torch.where(fire, resample(torch.exp(log_w - total), gen), arange_n)
        with record_function("powersmc.sync"):  # the one host sync of this step
            packed = torch.cat([torch.stack([fire.double(), total]), ancestors.double(),
                                finished.double()]).cpu().numpy()
        if not math.isfinite(packed[1]):
            raise DegenerateWeightsError("every particle has weight zero: q misses the target")
        source = packed[2 : 2 + n].astype(np.int64)
        fin = packed[2 + n :] > 0.5
        if packed[0] > 0.5:  # resample (Algorithm 1, lines 17-20)
            with record_function("powersmc.resample"):
                log_z += log_mean_weight(log_w)
                tokens, log_p_seq = tokens[ancestors], log_p_seq[ancestors]
                lengths, finished = lengths[ancestors], finished[ancestors]
                log_w.zero_()
                resample_steps.append(t)
        row_of = np.full(n, -1)
        row_of[alive] = np.arange(alive.size)
        new_alive = np.flatnonzero(~fin[source])
        index = row_of[source[new_alive]]
        bar.update(1)
        if new_alive.size == 0 or t == T:
            break
        if index.size != alive.size or (index != np.arange(index.size)).any():
            with record_function("powersmc.reorder"):
                model.reorder(state, torch.from_numpy(index).to(dev))
        alive = new_alive
        alive_dev = torch.from_numpy(alive).to(dev)
        with record_function("powersmc.forward"):
            logp = model.step(state, tokens[alive_dev, t - 1])
        cost.add_step(alive.size)
    bar.close()

    if alpha_prev != alpha:  # the ramp had not finished: bridge the rest of the way
        log_w += (alpha - alpha_prev) * log_p_seq
    log_z += log_mean_weight(log_w)
    total = torch.logsumexp(log_w, 0)
    chosen = int(torch.multinomial(torch.exp(log_w - total), 1, generator=gen))
    cost.seconds = time.perf_counter() - start
    return _result(model, tokens, lengths, finished, log_w, chosen, seed, cost, alpha, n,
                   ess_hist[:steps], resample_steps, log_z, logzt_hist[:steps])


def _result(model, tokens, lengths, finished, log_w, chosen, seed, cost, alpha, n,
            ess_hist, resample_steps, log_z, logzt_hist) -> SMCResult:
    """Move everything to the host once and decode each particle's text once."""
    lens, fin, lw = lengths.tolist(), finished.tolist(), log_w.tolist()
    rows = tokens.tolist()
    parts = [
        Particle(rows[i][: lens[i]], model.decode(rows[i][: lens[i]]), lw[i], fin[i])
        for i in range(n)
    ]
    best = parts[chosen]
    return SMCResult(
        method="smc", text=best.text, token_ids=best.token_ids, seed=seed, cost=cost,
        finished=best.finished, particles=parts, ess=ess_hist.tolist(),
        resample_steps=resample_steps, log_z=float(log_z), log_z_t=logzt_hist.tolist(),
        alpha=alpha, num_particles=n,
        stats={"chosen_particle": chosen, "num_resamples": len(resample_steps)},
    )
