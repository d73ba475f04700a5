"""Iteration-level scheduling of Power-SMC particle systems: the batch re-forms at every token.

`Scheduler` is continuous batching (Orca; vLLM's and llama.cpp's servers) for particle systems:
each `step` admits waiting systems while rows (and cache) are free, draws one token for every
live particle of every system in one engine pass, runs each system's Algorithm 1 bookkeeping,
and retires the systems that finished or were cancelled, freeing their rows and cache. Systems
with different alpha, ramp, N, kappa, resampler, order, alignment, T or proposal share every
forward pass; each keeps its own generator, weights and evidence, so each finished system is an
exact, independent run of Algorithm 1: its answer is properly weighted for
pi_alpha(y|x) proportional to p(y|x)^alpha (eq. 8 weights, eq. 6 ESS, App. B bridge) and its
exp(log_z) is unbiased for the normaliser, whatever shares the batch.

`_System` is Algorithm 1 for one system, written once; the engine (`backends.particles`) draws
every row's token in one vectorised pass, and the scheduler makes one host transfer per step
for all systems' decisions. `smc_sample_many`, `powersmc eval --batch-prompts` and the server
run on it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from powersmc.backends.particles import Draw, DrawSpec, ParticleEngine, particle_engine
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


def system_seed(seed: int, k: int) -> int:
    """The seed of the k-th system of a call seeded with `seed`: `seed` itself for k = 0 (so
    `smc_sample` keeps its seed's stream), independent streams for the others."""
    return seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(
        2, dtype=np.uint32).view(np.uint64)[0] >> 1)


@dataclass
class Options:
    """One system's validated settings (see `smc_sample_many` for their meaning)."""

    alpha: float
    n: int
    kappa: float
    resample: Any
    schedule: Schedule
    T: int
    adapted: bool
    align: int | str
    tau: float | None
    proposal: Proposal | None
    top_k: int | None
    top_p: float | None

    @classmethod
    def check(cls, *, alpha: float = 4.0, particles: int = 16, ess_threshold: float = 0.5,
              resampler: str = "systematic", ramp_tokens: int = 0,
              alpha_schedule: Schedule | Sequence[float] | None = None,
              max_new_tokens: int = 512, tau: float | None = None,
              proposal: Proposal | None = None, top_k: int | None = None,
              top_p: float | None = None, order: str = "standard",
              resample_align: int | str = 1) -> Options:
        alpha = check_alpha(alpha)
        check_nonnegative_int("ramp_tokens", ramp_tokens)
        adapted = check_order(order) == "adapted"
        if adapted and (tau is not None or proposal is not None):
            raise InputError("order", "'standard' when tau or proposal is set (the adapted order "
                             "needs the default proposal, whose weight depends on the prefix "
                             "only)", order)
        check_truncation(top_k, top_p)
        return cls(alpha=alpha, n=check_positive_int("particles", particles),
                   kappa=check_ess_threshold(ess_threshold), resample=get_resampler(resampler),
                   schedule=make_schedule(alpha, ramp_tokens, alpha_schedule),
                   T=check_positive_int("max_new_tokens", max_new_tokens), adapted=adapted,
                   align=check_resample_align(resample_align), tau=tau, proposal=proposal,
                   top_k=top_k, top_p=top_p)


class Handle:
    """A submitted request: `done`, `result()`, `cancel()`. Thread-safe to read and cancel."""

    def __init__(self, systems: int, rounds: int, select: str, key: AnswerKey | None,
                 generator: torch.Generator) -> None:
        self.rounds, self.select, self.key, self.gen = rounds, select, key, generator
        self.parts: list[SMCResult | None] = [None] * systems
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._done = threading.Event()
        self._result: SMCResult | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Leave at the next step: the systems' rows and cache are freed, no result comes."""
        self.cancelled = True

    def result(self) -> SMCResult:
        """The answer (Power-SMC's `SMCResult`); raises the run's error, or if not done."""
        if not self.done:
            raise RuntimeError("the request is not finished: step the scheduler")
        if self.error is not None:
            raise self.error
        assert self._result is not None
        return self._result

    def _fail(self, error: BaseException) -> None:
        if not self.done:
            self.error = error
            self._done.set()

    def _part(self, k: int, result: SMCResult) -> None:
        self.parts[k] = result
        if all(p is not None for p in self.parts) and not self.done:
            parts = [p for p in self.parts if p is not None]
            self._result = finish(parts, self.rounds, self.select, self.key, self.gen)[0]
            self._done.set()


class _System:
    """Algorithm 1 for one particle system of N particles: weights, ESS, resampling decision,
    alpha-bridge, evidence and diagnostics. Its rows are contiguous in the engine's batch."""

    def __init__(self, handle: Handle, part: int, prompt_ids: list[int], opts: Options,
                 gen: torch.Generator, seed: int, dev: torch.device, eos: torch.Tensor) -> None:
        self.handle, self.part, self.prompt_ids, self.o = handle, part, prompt_ids, opts
        self.gen, self.seed, self.eos = gen, seed, eos
        n, T = opts.n, opts.T
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
        self.t, self.alpha_prev, self.evals, self.passes = 0, 1.0, 0, 1
        self.resample_steps: list[int] = []
        self.started = 0.0
        self.align = 1

    @property
    def rows(self) -> int:
        return int(self.alive.size)

    def next_alpha(self) -> float:
        return float(self.o.schedule(self.t + 1))

    def weigh(self, draw: Draw, alpha_t: float) -> torch.Tensor:
        """Step t's weights (eq. 8), ESS (eq. 6) and resampling decision, on the device;
        returns what the host needs: [fire, log-sum of weights, ancestors, finished]."""
        self.t = t = self.t + 1
        o, flat_w = self.o, self.log_w.view(-1)
        if alpha_t != self.alpha_prev:  # exact bridge p^{a_prev} -> p^{a_t} (Sec. 5.3, App. B)
            flat_w += (alpha_t - self.alpha_prev) * self.log_p_seq
            self.alpha_prev = alpha_t
        flat_w.index_add_(0, self.alive_dev, draw.incr)  # eq. 8
        self.log_p_seq.index_add_(0, self.alive_dev, draw.logp)
        self.tokens[self.alive_dev, t - 1] = draw.tokens
        self.lengths[self.alive_dev] = t
        self.finished[self.alive_dev] = torch.isin(draw.tokens, self.eos)
        self.logzt_hist.append(draw.log_z.mean())  # eq. 13, mean over live particles
        ess_t = ess(self.log_w)
        self.ess_hist.append(ess_t[0])
        fire = ess_t < o.kappa * o.n
        if self.align > 1:  # only where a copy is cheap: length = prompt + t = 1 mod align
            fire &= (len(self.prompt_ids) + t - 1) % self.align == 0
        total = torch.logsumexp(self.log_w, -1)
        drawn = o.resample(torch.exp(self.log_w - total[:, None]), self.gen)
        drawn, self.post_w = drawn if isinstance(drawn, tuple) else (drawn, None)  # chopthin
        self.fire_dev = fire
        self.ancestors = torch.where(fire[:, None], drawn, self.identity).view(-1)
        return torch.cat([fire.double(), total, self.ancestors.double(),
                          self.finished.double()])

    def settle(self, packed: np.ndarray, engine: ParticleEngine, draw: Draw,
               row0: int) -> tuple[np.ndarray, torch.Tensor | None]:
        """Apply step t's decision (Algorithm 1, lines 17-20). Returns the batch rows (global,
        before the step's reorder) that the surviving particles continue, and their newest
        tokens when the adapted order redrew some."""
        o, n = self.o, self.o.n
        if not np.isfinite(packed[1]):
            raise DegenerateWeightsError("every particle has weight zero: q misses the target")
        source = packed[2 : 2 + n].astype(np.int64)
        fin = packed[2 + n :][source] > 0.5
        fired = packed[0] > 0.5
        if fired:
            with record_function("powersmc.resample"):
                self.log_z += log_mean_weight(self.log_w)
                a = self.ancestors
                self.tokens, self.log_p_seq = self.tokens[a], self.log_p_seq[a]
                self.lengths, self.finished = self.lengths[a], self.finished[a]
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
        self.evals += new_alive.size
        self.passes += 1
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

    def result(self, model: LanguageModel) -> SMCResult:
        """The end of Algorithm 1 (lines 21-23): final bridge, evidence, one particle drawn."""
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
        cost = Cost(seconds=time.perf_counter() - self.started, forward_passes=self.passes,
                    token_evals=self.evals, prefill_tokens=len(self.prompt_ids),
                    queue_seconds=self.started - self.handle.submitted)
        return SMCResult(
            method="smc", text=best.text, token_ids=best.token_ids, seed=self.seed, cost=cost,
            finished=best.finished, particles=parts,
            ess=torch.stack(self.ess_hist).tolist() if self.ess_hist else [],
            resample_steps=self.resample_steps, log_z=float(self.log_z),
            log_z_t=torch.stack(self.logzt_hist).tolist() if self.logzt_hist else [],
            alpha=o.alpha, num_particles=o.n,
            stats={"chosen_particle": chosen, "num_resamples": len(self.resample_steps),
                   "resample_align": self.align})


class Scheduler:
    """Continuous batching of Power-SMC particle systems over one engine.

        sched = Scheduler(lm)                  # optional limits: max_rows, max_systems
        h = sched.submit(prompt, alpha=4.0, particles=16, max_new_tokens=256, seed=0)
        sched.step()                           # admit, one token for every live particle, retire
        h.done; h.result(); h.cancel()
        sched.run()                            # step until every submitted system is done

    Each `step` admits waiting systems in arrival order while the batch has rows (`max_rows`,
    and the backend's own limit: 255 sequences on llama.cpp) and systems (`max_systems`) free
    and the engine has room (llama.cpp: KV cells for the prompt and T tokens per row); the
    first that does not fit waits, and so does everything after it (no starvation). On an
    engine that cannot join running batches (Transformers) systems join only an empty batch.
    Not thread-safe: one thread steps; `submit` and `Handle.cancel` may come from others.
    """

    def __init__(self, model: LanguageModel, *, max_rows: int | None = None,
                 max_systems: int | None = None, progress: bool = False) -> None:
        self.model = model
        self.engine = particle_engine(model)
        limit = getattr(model, "max_rows", None)
        self.max_rows = min(x for x in (max_rows, limit) if x is not None) if (
            max_rows is not None or limit is not None) else None
        if max_rows is not None:
            check_positive_int("max_rows", max_rows)
        if max_systems is not None:
            check_positive_int("max_systems", max_systems)
        self.max_systems = max_systems
        self.eos = eos_tensor(model)
        self.waiting: deque[_System] = deque()
        self.live: list[_System] = []
        self.steps = 0
        self._joined: list[_System] = []  # admitted, not yet through their first step
        self._lock = threading.Lock()
        self._bar = tqdm(desc="power-smc", unit=" answer", total=0, disable=not progress,
                         leave=False)

    # --- requests -------------------------------------------------------------------------

    def submit(self, prompt: Prompt, *, seed: int | None = None, rounds: int = 1,
               select: str = "sample", key: AnswerKey | None = None,
               **options: Any) -> Handle:
        """Queue one request: `rounds` particle systems on `prompt` (the options of
        `smc_sample_many`). Bad options raise `InputError` here, before anything runs."""
        opts = Options.check(**options)
        check_positive_int("rounds", rounds)
        check_select(select)
        if self.max_rows is not None and opts.n > self.max_rows:
            raise InputError("particles", f"at most {self.max_rows} on this backend", opts.n)
        ids = encode_prompt(self.model, prompt, opts.T)
        gen, seed = make_generator(seed, self.model.device)
        handle = Handle(rounds, rounds, select, key, gen)
        systems = []
        for r in range(rounds):
            g, s = make_generator(system_seed(seed, r + 1) if rounds > 1 else seed,
                                  self.model.device)
            systems.append(_System(handle, r, ids, opts, g if rounds > 1 else gen, s,
                                   self.model.device, self.eos))
        with self._lock:
            self.waiting.extend(systems)
            self._bar.total += rounds
        return handle

    @property
    def live_rows(self) -> int:
        return sum(s.rows for s in self.live)

    def cache_in_use(self) -> int | None:
        """KV cells the engine's states hold (llama.cpp: written and not freed, parked cells
        included); None for an engine that does not count them."""
        used = getattr(self.model, "cells_in_use", None)
        segments = getattr(self.engine, "segments", None)
        if not callable(used) or segments is None:
            return None
        return sum(used(s.state) for s in segments)

    @property
    def idle(self) -> bool:
        return not self.live and not self.waiting

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Step until every submitted system is done."""
        while not self.idle:
            self.step()

    def admit(self) -> None:
        """Retire cancelled systems and admit waiting ones now (`step` does this first; a
        server calls it before a step to report what the step will run)."""
        self._drop_cancelled()
        self._joined += self._admit()

    def step(self) -> None:
        """Admit waiting systems, draw one token for every live particle, retire the done."""
        self.admit()
        joined, self._joined = self._joined, []
        if not self.live:
            return
        alpha = {id(s): s.next_alpha() for s in self.live}
        try:
            draw = self.engine.advance(list(alpha.values()))
        except Exception as exc:  # the batch's pass failed: every live system fails with it
            self._fail_all(exc)
            return
        failed = getattr(self.engine, "failed", None) or []
        for k, error in failed:  # a joiner whose prompt failed: that request alone fails
            joined[k].handle._fail(error)
        if failed:
            gone = {id(joined[k]) for k, _ in failed}
            self.live = [s for s in self.live if id(s) not in gone]
            if not self.live:
                return
        live = self.live
        alphas = [alpha[id(s)] for s in live]
        self.steps += 1
        bounds = np.cumsum([0] + [s.rows for s in live])
        with record_function("powersmc.weights"):
            packs = [s.weigh(_rows(draw, lo, hi), a)
                     for s, a, lo, hi in zip(live, alphas, bounds[:-1], bounds[1:], strict=True)]
        with record_function("powersmc.sync"):  # the one host transfer of this step
            host = torch.cat(packs).cpu().numpy()
        index, counts, lasts, keep, at = [], [], [], [], 0
        for s, p, lo in zip(live, packs, bounds[:-1], strict=True):
            part = host[at : at + p.numel()]
            at += p.numel()
            try:
                rows, last = s.settle(part, self.engine, draw, int(lo))
            except Exception as exc:  # this system alone fails (e.g. degenerate weights)
                s.handle._fail(exc)
                rows, last = np.zeros(0, dtype=np.int64), None
            else:
                if rows.size == 0:
                    self._retire(s)
            index.append(rows)
            counts.append(int(rows.size))
            lasts.append(last if last is not None else
                         draw.tokens[torch.from_numpy(rows).to(draw.tokens.device)])
            if rows.size:
                keep.append(s)
        adapted = any(s.o.adapted for s in live)
        with record_function("powersmc.reorder"):
            try:
                self.engine.reorder(torch.from_numpy(np.concatenate(index)).to(
                    self.engine.device), counts, torch.cat(lasts) if adapted else None)
            except Exception as exc:  # the batch's rows are lost: every live system fails
                self.live = keep
                self._fail_all(exc)
                return
        self.live = keep

    def close(self) -> None:
        """Cancel everything and release the engine."""
        with self._lock:
            for s in list(self.waiting) + self.live:
                s.handle._fail(InputError("request", "a running scheduler (it was closed)"))
            self.waiting.clear()
        self.live = []
        self.engine.close()
        self._bar.close()

    # --- internals ------------------------------------------------------------------------

    def _admit(self) -> list[_System]:
        """Move waiting systems into the batch while they fit; returns those admitted."""
        joined: list[_System] = []
        with self._lock:
            rows, systems = self.live_rows, len(self.live)
            while self.waiting:
                s = self.waiting[0]
                o = s.o
                if (self.max_rows is not None and rows + o.n > self.max_rows) or (
                        self.max_systems is not None and systems >= self.max_systems) or (
                        not self.engine.room(len(s.prompt_ids), o.n, o.n * o.T)):
                    break
                self.waiting.popleft()
                s.align = self.engine.fork_block if o.align == "block" else int(o.align)
                spec = DrawSpec(s.gen, tau=o.tau, proposal=o.proposal, top_k=o.top_k,
                                top_p=o.top_p, redraws=o.adapted)
                try:
                    self.engine.admit(s.prompt_ids, o.n, spec, budget=o.n * o.T)
                except Exception as exc:  # noqa: BLE001 - e.g. an option this engine refuses
                    s.handle._fail(exc)
                    self._bar.update(1)
                    continue
                s.started = time.perf_counter()
                self.live.append(s)
                joined.append(s)
                rows, systems = rows + o.n, systems + 1
        return joined

    def _drop_cancelled(self) -> None:
        with self._lock:
            for s in [s for s in self.waiting if s.handle.cancelled]:
                self.waiting.remove(s)
                s.handle._fail(Cancelled())
        # systems admitted but not yet stepped hold no rows yet: they leave after one step
        running = self.live[: len(self.live) - len(self._joined)]
        gone = [s.handle.cancelled or s.handle.done for s in running]
        if not any(gone):
            return
        index, counts, row = [], [], 0
        for s, g in zip(running, gone, strict=True):
            if not g:
                index.append(np.arange(row, row + s.rows))
            else:
                s.handle._fail(Cancelled())
            counts.append(0 if g else s.rows)
            row += s.rows
        self.engine.reorder(torch.from_numpy(np.concatenate(index + [np.zeros(0, np.int64)]))
                            .to(self.engine.device), counts)
        self.live = [s for s, g in zip(running, gone, strict=True) if not g] + self._joined

    def _retire(self, s: _System) -> None:
        try:
            s.handle._part(s.part, s.result(self.model))
        except Exception as exc:  # noqa: BLE001 - this request alone fails
            s.handle._fail(exc)
        self._bar.update(1)

    def _fail_all(self, exc: BaseException) -> None:
        for s in self.live:
            s.handle._fail(exc)
        self.live, self._joined = [], []
        self.engine.close()


class Cancelled(Exception):
    """The request was cancelled before it finished."""


def _rows(draw: Draw, lo: int, hi: int) -> Draw:
    return Draw(draw.tokens[lo:hi], draw.logp[lo:hi], draw.incr[lo:hi], draw.log_z[lo:hi])
