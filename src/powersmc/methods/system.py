"""Algorithm 1 for one particle system, written once: weights, ESS, resampling, alpha-bridge,
evidence and diagnostics. The `Scheduler` runs any number of systems (and programs' rows) in
one batch; a system's rows are contiguous in it.

Each step is two halves, so that one host transfer serves every system of the batch:
`weigh` (on the device: eq. 8 weights, eq. 6 ESS, the would-be ancestors) returns a `Decision`
of device tensors; the scheduler copies every live unit's decision to the host at once, and
`settle` applies it (Algorithm 1, lines 17-20). Whatever shares the batch, a finished system's
answer is properly weighted for pi_alpha(y|x) proportional to p(y|x)^alpha and its exp(log_z)
is unbiased for the normaliser (App. B bridge for ramps and schedules).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from powersmc.backends.engine import Draw, DrawSpec, ParticleEngine
from powersmc.backends.protocol import LanguageModel
from powersmc.errors import DegenerateWeightsError
from powersmc.methods.smc import Particles
from powersmc.results import Cost, Particle, SMCResult
from powersmc.weights import ess, log_mean_weight


@dataclass
class Decision:
    """Step t's decision for one system, on the device until the scheduler's one transfer:
    whether it resamples, the log-sum of its weights, every particle's ancestor, and which
    particles have finished."""

    fire: torch.Tensor  # bool [1]
    total: torch.Tensor  # float64 [1]
    ancestors: torch.Tensor  # int64 [N]
    finished: torch.Tensor  # bool [N]


class System:
    """Algorithm 1 for one system of N particles (see the module docstring)."""

    def __init__(self, req: Particles, dev: torch.device, eos: torch.Tensor) -> None:
        self.ids, self.o, self.gen, self.seed, self.eos = (
            list(req.ids), req.options, req.generator, req.seed, eos)
        n, T = self.o.n, self.o.T
        f64: dict[str, Any] = dict(dtype=torch.float64, device=dev)
        self.tokens = torch.zeros((n, T), dtype=torch.long, device=dev)
        self.log_w = torch.zeros((1, n), **f64)
        self.log_p_seq = torch.zeros(n, **f64)  # log p(y_{1:t}) per particle, for the bridge
        self.lengths = torch.zeros(n, dtype=torch.long, device=dev)
        self.finished = torch.zeros(n, dtype=torch.bool, device=dev)
        self.ess_hist: list[torch.Tensor] = []
        self.logzt_hist: list[torch.Tensor] = []
        self.log_z = torch.zeros(1, **f64)
        self.identity = torch.arange(n, device=dev)
        self.alive = np.arange(n)  # particle id of each of this system's rows
        self.alive_dev = torch.from_numpy(self.alive).to(dev)
        self.t, self.alpha_prev = 0, 1.0
        self.cost = Cost(forward_passes=1, prefill_tokens=len(self.ids))
        self.resample_steps: list[int] = []
        self.started = 0.0
        self.run: Any = None  # the program it belongs to (set by the scheduler)
        self.align = 1
        self.pause, self.paused, self.resumed = req.pause, False, False
        if self.pause:  # per position: log p and zeta_t = a log p - log q (the moves' ratios)
            self.lp = torch.zeros((n, T), **f64)
            self.zeta = torch.zeros((n, T), **f64)

    # --- what the scheduler needs of every unit -------------------------------------------

    @property
    def n(self) -> int:
        """The rows it joins the batch with: N, or its live particles when resumed."""
        return int(self.alive.size) if self.resumed else self.o.n

    def prefixes(self) -> list[list[int]] | None:
        """Each row's tokens after the prompt when it joins (a resumed system's particles)."""
        if not self.resumed:
            return None
        rows = self.tokens[torch.from_numpy(self.alive).to(self.tokens.device), : self.t]
        return rows.tolist()

    @property
    def rows(self) -> int:
        return int(self.alive.size)

    @property
    def budget(self) -> int:
        return self.n * (self.o.T - self.t)

    def spec(self, fork_block: int) -> DrawSpec:
        o = self.o
        self.align = fork_block if o.align == "block" else int(o.align)
        return DrawSpec(self.gen, tau=o.tau, proposal=o.proposal, top_k=o.top_k, top_p=o.top_p,
                        redraws=o.adapted)

    def next_alpha(self) -> float:
        return float(self.o.schedule(self.t + 1))

    # --- one step -------------------------------------------------------------------------

    def weigh(self, draw: Draw, alpha_t: float, engine: ParticleEngine, row0: int) -> Decision:
        """Step t's weights (eq. 8), ESS (eq. 6) and resampling decision, on the device."""
        self.t = t = self.t + 1
        o, flat_w = self.o, self.log_w.view(-1)
        if alpha_t != self.alpha_prev:  # exact bridge p^{a_prev} -> p^{a_t} (Sec. 5.3, App. B)
            flat_w += (alpha_t - self.alpha_prev) * self.log_p_seq
            self.alpha_prev = alpha_t
        flat_w.index_add_(0, self.alive_dev, draw.incr)  # eq. 8
        self.log_p_seq.index_add_(0, self.alive_dev, draw.logp)
        self.tokens[self.alive_dev, t - 1] = draw.tokens
        if self.pause:
            self.lp[self.alive_dev, t - 1] = draw.logp
            self.zeta[self.alive_dev, t - 1] = draw.incr
        self.lengths[self.alive_dev] = t
        self.finished[self.alive_dev] = torch.isin(draw.tokens, self.eos)
        self.logzt_hist.append(draw.log_z.mean())  # eq. 13, mean over live particles
        total = torch.logsumexp(self.log_w, -1)
        ess_t = ess(self.log_w, total)
        self.ess_hist.append(ess_t[0])
        fire = ess_t < o.kappa * o.n
        if self.align > 1:  # only where a copy is cheap: length = prompt + t = 1 mod align
            fire &= (len(self.ids) + t - 1) % self.align == 0
        drawn = o.resample(torch.exp(self.log_w - total[:, None]), self.gen)
        drawn, self.post_w = drawn if isinstance(drawn, tuple) else (drawn, None)  # chopthin
        self.ancestors = torch.where(fire[:, None], drawn, self.identity).view(-1)
        return Decision(fire, total, self.ancestors, self.finished.clone())

    def settle(self, d: Decision, engine: ParticleEngine, draw: Draw,
               row0: int) -> tuple[np.ndarray, torch.Tensor | None]:
        """Apply step t's decision (host copies of its tensors; Algorithm 1, lines 17-20).
        Returns the batch rows (global, before the step's reorder) that the surviving
        particles continue, and their newest tokens when the adapted order redrew some."""
        o, n = self.o, self.o.n
        if not np.isfinite(d.total.item()):
            raise DegenerateWeightsError("every particle has weight zero: q misses the target")
        source = d.ancestors.numpy()
        fin = d.finished.numpy()[source]
        fired = bool(d.fire.item())
        if fired:
            with record_function("powersmc.resample"):
                self.log_z += log_mean_weight(self.log_w)
                a = self.ancestors
                self.tokens, self.log_p_seq = self.tokens[a], self.log_p_seq[a]
                self.lengths, self.finished = self.lengths[a], self.finished[a]
                if self.pause:
                    self.lp, self.zeta = self.lp[a], self.zeta[a]
                if self.post_w is None:  # equally weighted after resampling (line 20)
                    self.log_w.zero_()
                else:  # chopthin: its weights, on the scale of the mean reset into log_z
                    self.log_w.copy_(self.post_w)
                self.resample_steps.append(self.t)
        row_of = np.full(n, -1)
        row_of[self.alive] = np.arange(self.alive.size)
        last = None
        if o.adapted and fired:
            with record_function("powersmc.redraw"):
                fin, last = self._redraw(engine, draw, source, row_of, fin, row0)
        new_alive = np.flatnonzero(~fin)
        if new_alive.size == 0 or self.t == o.T:
            return np.zeros(0, dtype=np.int64), None
        index = row_of[source[new_alive]] + row0
        self.alive = new_alive
        self.alive_dev = torch.from_numpy(new_alive).to(self.tokens.device)
        if self.pause and fired:  # leave the batch; the program moves the particles
            self.paused = True
            return np.zeros(0, dtype=np.int64), None
        self.cost.add_step(int(new_alive.size))
        return index, None if last is None else last[self.alive_dev]

    def _redraw(self, engine: ParticleEngine, draw: Draw, source: np.ndarray,
                row_of: np.ndarray, fin: np.ndarray,
                row0: int) -> tuple[np.ndarray, torch.Tensor]:
        """The fully adapted order's draw, after a resampling at step t (`order='adapted'`).

        The weight of step t is log Z_t(y_{<t}), a function of the prefix only, so selecting
        ancestors by it and then drawing y_t ~ q(. | y_{<t}) for every child is a valid SMC step
        for the same targets p(y_{1:t})^alpha_t: each (prefix, weight) pair is unchanged and y_t
        is drawn from the proposal given its prefix. The first copy of an ancestor keeps the
        token the ancestor drew (a draw from q independent of the selection, which never looked
        at it); every further copy draws afresh. Particles copied from one that had already
        finished stay finished. Updates tokens, log p and finished in place; returns the
        finished flags on the host and every particle's token at t."""
        t = self.t
        src = row_of[source]  # this system's row of each particle's ancestor; -1: finished
        cand = np.flatnonzero(src >= 0)
        _, first = np.unique(src[cand], return_index=True)
        repeat = np.ones(cand.size, dtype=bool)
        repeat[first] = False
        again = cand[repeat]
        if again.size:
            dev = self.tokens.device
            again_dev, rows = (torch.from_numpy(a).to(dev) for a in (again, src[again]))
            fresh = engine.redraw(rows + row0)
            self.log_p_seq[again_dev] += fresh.logp - draw.logp[row0 + rows]
            self.tokens[again_dev, t - 1] = fresh.tokens
            done = torch.isin(fresh.tokens, self.eos)
            self.finished[again_dev] = done
            fin = fin.copy()
            fin[again] = done.cpu().numpy()
        return fin, self.tokens[:, t - 1]

    # --- a paused system: its particles, moved, and resumed ----------------------------------

    def particle(self, i: int) -> tuple[list[int], list[float], list[float], bool]:
        """Particle i's tokens, log p and zeta_t of each, and whether it ended in EOS."""
        n = int(self.lengths[i])
        return (self.tokens[i, :n].tolist(), self.lp[i, :n].tolist(),
                self.zeta[i, :n].tolist(), bool(self.finished[i]))

    def move(self, i: int, r: int, tokens: Sequence[int], lp: Sequence[float],
             zeta: Sequence[float], finished: bool) -> None:
        """Particle i keeps its first r tokens and continues with `tokens` (a move accepted
        by the program's MH kernel); its weight is unchanged (resample-move)."""
        n = r + len(tokens)
        dev = self.tokens.device
        self.tokens[i, r:n] = torch.tensor(tokens, dtype=torch.long, device=dev)
        self.lp[i, r:n] = torch.tensor(lp, dtype=torch.float64, device=dev)
        self.zeta[i, r:n] = torch.tensor(zeta, dtype=torch.float64, device=dev)
        self.lengths[i], self.finished[i] = n, finished
        self.log_p_seq[i] = self.lp[i, :n].sum()

    def resume(self) -> bool:
        """Rejoin the batch with its live particles after `move`s: False when none is live
        (the program then takes `outcome` at once)."""
        self.alive = np.flatnonzero(~self.finished.cpu().numpy())
        self.alive_dev = torch.from_numpy(self.alive).to(self.tokens.device)
        self.paused, self.resumed = False, True
        self.cost = Cost(forward_passes=1,
                         prefill_tokens=(len(self.ids) + self.t) * int(self.alive.size))
        return self.alive.size > 0

    def outcome(self, model: LanguageModel) -> SMCResult | System:
        """The end of Algorithm 1 (lines 21-23): final bridge, evidence, one particle drawn;
        or, paused, the system itself."""
        if self.paused:
            return self
        o = self.o
        if self.alpha_prev != o.alpha:  # the ramp had not finished: bridge the rest of the way
            self.log_w.view(-1).add_((o.alpha - self.alpha_prev) * self.log_p_seq)
        self.log_z += log_mean_weight(self.log_w)
        total = torch.logsumexp(self.log_w, -1, keepdim=True)
        chosen = int(torch.multinomial(torch.exp(self.log_w - total), 1, generator=self.gen))
        lens, fins, lw = self.lengths.tolist(), self.finished.tolist(), self.log_w[0].tolist()
        rows = self.tokens.tolist()
        parts = [Particle(rows[i][: lens[i]], model.decode(rows[i][: lens[i]]), lw[i], fins[i])
                 for i in range(o.n)]
        best = parts[chosen]
        self.cost.seconds = time.perf_counter() - self.started
        return SMCResult(
            method="smc", text=best.text, token_ids=best.token_ids, seed=self.seed,
            cost=self.cost, finished=best.finished, particles=parts,
            ess=torch.stack(self.ess_hist).tolist() if self.ess_hist else [],
            resample_steps=self.resample_steps, log_z=float(self.log_z),
            log_z_t=torch.stack(self.logzt_hist).tolist() if self.logzt_hist else [],
            alpha=o.alpha, num_particles=o.n,
            stats={"chosen_particle": chosen, "num_resamples": len(self.resample_steps),
                   "resample_align": self.align})
