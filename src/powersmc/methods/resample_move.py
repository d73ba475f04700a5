"""Resample-move Power-SMC (Gilks & Berzuini 2001; "Sampling for Quality", arXiv 2604.16453).

Algorithm 1 (`methods.system`), and after every resampling each particle takes M MH moves
that leave the current intermediate target gamma_t(y_{1:t}) proportional to p(y_{1:t})^alpha
invariant, restoring the diversity the resampling destroyed. A move of particle y at step t:
a cut r uniform on {0, .., t - 1}; if r falls after y's EOS (a finished particle's padding) the
move is a self-transition with no model call; otherwise y_<r is kept, the rest regenerated
through length t (or its EOS) from q = p^alpha / Z (temperature 1/alpha, full vocabulary),
and accepted with log R = sum_{t' >= r} [zeta_t'(y') - zeta_t'(y)] (`mcmc.mh_log_ratio`).
This is the fixed-horizon kernel of `methods.ppt` at horizon t: EOS stays absorbing, a finished
particle can be moved to another finished or unfinished one and back, and the cut law does not
depend on the state, so no correction is needed. The weights are not changed, so the
evidence estimate stays unbiased and every output keeps Power-SMC's guarantees (the moves
only reduce the variance a resampling leaves).

The moves need zeta_t of every particle's past positions at the target's exponent: the system
keeps a log p and zeta_t = alpha log p - log q per position, exact for the default proposal
(tau = 1/alpha) at a constant alpha, so this method takes no ramp and no other proposal.
"""

from __future__ import annotations

from typing import Any

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import check_nonnegative_int, encode_prompt, make_generator
from powersmc.methods.mcmc import accept, mh_log_ratio
from powersmc.methods.program import Continue, Program, spawn
from powersmc.methods.selection import AnswerKey, apply_select, check_select
from powersmc.methods.smc import Options, Particles
from powersmc.methods.system import System


def smc_rm_program(model: LanguageModel, prompt: Prompt, *, seed: int | None = None,
                   rejuvenate_moves: int = 1, select: str = "sample",
                   key: AnswerKey | None = None, **options: Any) -> Program:
    """Power-SMC with `rejuvenate_moves` MH moves per particle after each resampling (see the
    module docstring); `options` as `smc_program`'s (no ramp)."""
    opts = Options.check(**options)
    M = check_nonnegative_int("rejuvenate_moves", rejuvenate_moves)
    if options.get("ramp_tokens") or options.get("alpha_schedule") is not None:
        raise InputError("ramp_tokens", "0 for smc-rm (its moves target p^alpha at a constant "
                         "alpha)", options.get("ramp_tokens") or "alpha_schedule")
    check_select(select)
    ids = encode_prompt(model, prompt, opts.T)
    gen, seed = make_generator(seed, model.device)
    (out,) = yield [Particles(ids, opts, gen, seed, pause=M > 0)]
    proposed = accepted = 0
    while isinstance(out, System):  # paused after a resampling: move, then resume
        system, t = out, out.t
        states = [system.particle(i) for i in range(opts.n)]
        for _ in range(M):
            cuts = [int(torch.randint(t, (1,), generator=gen, device=model.device))
                    for _ in range(opts.n)]
            movers = [i for i in range(opts.n) if cuts[i] < len(states[i][0])]
            if not movers:
                continue
            outs = yield [Continue(ids + states[i][0][: cuts[i]], 1, t - cuts[i], spawn(gen),
                                   tau=1.0 / opts.alpha) for i in movers]
            for i, rows in zip(movers, outs, strict=True):
                r, (tokens, lp, zeta, _) = cuts[i], states[i]
                new_zeta = [opts.alpha * a - b for a, b in zip(rows.logp[0], rows.logq[0],
                                                              strict=True)]
                proposed += 1
                if accept(mh_log_ratio(new_zeta, zeta[r:]), gen):
                    accepted += 1
                    states[i] = (tokens[:r] + rows.tokens[0], lp[:r] + rows.logp[0],
                                 zeta[:r] + new_zeta, rows.finished[0])
                    system.move(i, r, rows.tokens[0], rows.logp[0], new_zeta,
                                rows.finished[0])
        if system.resume():
            (out,) = yield [system]
        else:  # every particle has finished: Algorithm 1's end
            out = system.outcome(model)
    out.method = "smc-rm"
    out.stats.update(rejuvenate_moves=M, moves_proposed=proposed, moves_accepted=accepted,
                     move_acceptance=accepted / proposed if proposed else None)
    return apply_select(out, select, key)
