"""`LMParticles`: the engine (`backends.engine.ParticleEngine`) of every backend that returns
next-token log-probabilities (`LanguageModel`: Transformers, llama.cpp, toy models): tokens are
drawn here from the model's log-probs; `particle_engine` picks a model's engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.profiler import record_function

from powersmc.backends.engine import Draw, DrawSpec, ParticleEngine
from powersmc.backends.protocol import LanguageModel
from powersmc.proposals import sample_tempered, truncate_logprobs
from powersmc.weights import log_power_normalizer


@dataclass
class _Joiner:
    """A request waiting for its prefill: `per` rows on each of `prompts`."""

    prompts: list[list[int]]
    per: int
    spec: DrawSpec
    budget: int

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.per

    @property
    def length(self) -> int:
        """The most cells one of its rows holds: its prompt and its share of the budget."""
        return max(len(p) for p in self.prompts) + -(-self.budget // self.rows) + 1


@dataclass
class _Plan:
    """Where this step's next joiner goes: the newest segment, with the rows planned into it."""

    state: Any  # the newest segment's model state (None: a segment the plan opens)
    held: int  # rows that state holds now
    placed: int  # rows the newest segment will hold, the planned joiners' included
    opened: int  # segments the plan opens


@dataclass
class _Segment:
    """One model state (on llama.cpp: one context) holding the rows of a run of consecutive
    live systems."""

    state: Any
    systems: int  # how many of the live systems, in row order, it holds


class LMParticles:
    """`ParticleEngine` over a `LanguageModel`: tokens are drawn here, from its log-probs.

    The forward pass of a step's tokens runs lazily at the next `advance`, after the loop has
    applied its ancestor indices, so each step costs one batched forward over the rows that
    survive it (finished particles have left the batch, App. D); systems admitted since are
    prefilled after it (their prompts evaluated once, shared by their rows) and join the draw.

    Draws: the systems on the default proposal (tau = 1/alpha_t, no truncation) are drawn in
    one vectorised pass (per-row exponents); the others system by system. Every system draws
    from its own generator, consuming exactly what it would alone, so a seeded system's tokens
    depend on the batch only through the model's log-probs (bit-identical on batch-invariant
    models such as `FunctionLM`). Requests join a running batch (`model.extend`) where the model
    says `joins_running` (llama.cpp, toy models, Transformers' static cache); otherwise only an
    empty batch.

    Bounded memory on a fixed-size cache (llama.cpp): the model is asked whether a joining
    system's rows fit beside the state's (`fits`; a state holds at most `model.max_rows` rows,
    llama.cpp's 256 sequences of a context); if not, the system opens a new segment (a fresh
    context, sized for every live and joining row) and the old one takes no new system: it
    drains as its systems finish and is freed when empty. A step makes one forward per
    segment: 32 systems of 16 rows run as two contexts of 256 rows. At most `max_states`
    segments live at once; a system that would open one more waits (`room`).
    """

    max_states = 3  # segments (llama.cpp contexts) alive at once: two full, one draining

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.device = model.device
        self.fork_block = 1  # rows are copied with their cache, at any length
        self.max_rows = model.max_rows  # one request's rows share one state
        self.joins_running = model.joins_running
        self.segments: list[_Segment] = []
        self.logp: torch.Tensor | None = None  # next-token log p of the rows, if computed
        self.pending: torch.Tensor | None = None  # tokens drawn but not yet fed to the model
        self.specs: list[DrawSpec] = []  # per live system, in row order
        self.counts: list[int] = []  # rows per live system
        self.joining: list[_Joiner] = []
        self.runs: list[tuple[int, int, bool]] = []  # the joiners' runs (lo, hi, opens one)
        self.plan: _Plan | None = None  # where the next joiner goes
        self.failed: dict[int, Exception] = {}  # joiners whose prefill failed
        self.alphas: torch.Tensor | None = None  # per-row exponent of the last draw

    @property
    def state(self) -> Any:
        """The model state of the newest segment (None when the batch is empty)."""
        return self.segments[-1].state if self.segments else None

    def room(self, prompt_len: int, rows: int, budget: int) -> bool:
        """An empty engine: yes. Else, where the model joins running batches: whether the
        request's rows fit without opening more than `max_states` segments."""
        if not (self.counts or self.joining):
            return True
        if not self.joins_running:
            return False
        trial = replace(self._planned())
        opens = self._place(trial, rows, prompt_len + -(-budget // rows) + 1)
        return len(self.segments) + trial.opened <= self.max_states or not opens

    def admit(self, prompt: Sequence[int], rows: int, spec: DrawSpec, *, budget: int,
              prefixes: Sequence[Sequence[int]] | None = None) -> None:
        head = [int(i) for i in prompt]
        if prefixes is None:
            j = _Joiner([head], rows, spec, budget)
        else:
            j = _Joiner([head + [int(i) for i in p] for p in prefixes], 1, spec, budget)
        new, k = self._place(self._planned(), j.rows, j.length), len(self.joining)
        if not new and self.runs and self.joining[-1].per == j.per:
            self.runs[-1] = (self.runs[-1][0], k + 1, self.runs[-1][2])
        else:
            self.runs.append((k, k + 1, new))
        self.joining.append(j)

    def _planned(self) -> _Plan:
        """The plan of this step's joiners so far (a fresh one before the first)."""
        if self.plan is None or not self.joining:
            held = self._segment_rows()[-1] if self.segments else 0
            self.plan = _Plan(self.state, held, held, 0)
        return self.plan

    def _place(self, plan: _Plan, rows: int, length: int) -> bool:
        """Plan a joiner of `rows` rows of at most `length` cells into the newest segment
        while it fits there (`model.fits`; a segment opened by the plan holds at most
        `model.max_rows` rows and is sized for every row that joins it), else into a new
        one; returns whether it opens one."""
        cap = self.model.max_rows
        fits = (plan.state is not None or plan.opened > 0) and (
            cap is None or plan.placed + rows <= cap)
        if fits and plan.state is not None:
            fits = self.model.fits(plan.state, plan.placed + rows - plan.held, length)
        if not fits:
            plan.state, plan.held, plan.placed, plan.opened = None, 0, 0, plan.opened + 1
        plan.placed += rows
        return not fits

    def advance(self, alphas: Sequence[float]) -> Draw:
        """See `ParticleEngine.advance`; a joining system whose prompt fails to evaluate is
        left out (listed in `failed` with its error, by its place among the joiners)."""
        parts = []
        if self.pending is not None:
            with record_function("powersmc.forward"):
                lo = 0
                for seg, rows in zip(self.segments, self._segment_rows(), strict=True):
                    parts.append(self.model.step(seg.state, self.pending[lo : lo + rows]))
                    lo += rows
        joiners, self.failed = len(self.joining), {}
        if self.joining:
            with record_function("powersmc.prefill"):
                parts += self._prefill()
        if self.failed:  # the failed joiners have no rows: drop their exponents
            gone = {len(alphas) - joiners + k for k in self.failed}
            alphas = [a for i, a in enumerate(alphas) if i not in gone]
        if not parts:  # nothing runs: every system was a joiner whose prompt failed
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            return Draw(torch.zeros(0, dtype=torch.long, device=self.device), empty, empty, empty)
        logp = parts[0] if len(parts) == 1 else torch.cat(parts)
        if any(s.truncating for s in self.specs):  # top-k / top-p: the truncated model
            lo = 0
            for c, s in zip(self.counts, self.specs, strict=True):
                if s.truncating:
                    logp[lo : lo + c] = truncate_logprobs(logp[lo : lo + c], s.top_k, s.top_p)
                lo += c
        self.logp = logp
        with record_function("powersmc.sample"):
            draw = self._draw_all(alphas)
        self.pending = draw.tokens
        return draw

    def _prefill(self) -> list[torch.Tensor]:
        """Evaluate the joining systems' prompts into the segments planned at admission
        (`runs`: consecutive joiners with equal rows per prompt, each prefilled in one call,
        into the newest segment or one they open); logp per run. If a run's call fails, its
        systems are retried one by one so that only the failing system is left out."""
        out: list[torch.Tensor] = []
        joining = self.joining
        for lo, hi, new in self.runs:
            try:
                out.append(self._join(joining[lo:hi], joining[lo:], new))
            except Exception as exc:  # noqa: BLE001 - find the system(s) that fail
                if hi - lo == 1:
                    self.failed[lo] = exc
                    continue
                opened = not new  # the segment the run goes to exists
                for i in range(lo, hi):
                    try:
                        out.append(self._join(joining[i : i + 1], joining[i:], not opened))
                        opened = True
                    except Exception as one:  # noqa: BLE001 - it alone does not join
                        self.failed[i] = one
        self.joining, self.runs, self.plan = [], [], None
        return out

    def _join(self, group: list[_Joiner], rest: list[_Joiner], new: bool) -> torch.Tensor:
        """Prefill one group of joiners (equal rows per prompt) into the newest segment or
        (`new`) a new one sized for them and every joiner after them; register them and
        return their logp."""
        rows, budget = group[0].per, sum(j.budget for j in group)
        prompts = [p for j in group for p in j.prompts]
        if new or not self.segments:  # sized for every live and joining row: it takes the
            want = sum(self.counts) + sum(j.rows for j in rest)  # next joiners as others drain
            if self.model.max_rows is not None:
                want = min(want, self.model.max_rows)
            state, logp = self.model.prefill_many(prompts, rows, budget=budget,
                                                  room=(want, max(j.length for j in rest)))
            self.segments.append(_Segment(state, 0))
        else:
            logp = self.model.extend(self.segments[-1].state, prompts, rows, budget=budget)
        self.segments[-1].systems += len(group)
        for j in group:
            self.specs.append(j.spec)
            self.counts.append(j.rows)
        return logp

    def _segment_rows(self) -> list[int]:
        out, k = [], 0
        for seg in self.segments:
            out.append(sum(self.counts[k : k + seg.systems]))
            k += seg.systems
        return out

    def logprobs(self, lo: int, hi: int) -> torch.Tensor:
        assert self.logp is not None
        return self.logp[lo:hi]

    def cells_in_use(self) -> int | None:
        used = [self.model.cells_in_use(s.state) for s in self.segments]
        return sum(u for u in used if u is not None) if None not in used else None

    def redraw(self, rows: torch.Tensor) -> Draw:
        assert self.logp is not None and self.alphas is not None
        row_system = self._row_system()
        draws = []
        for r in rows.tolist():  # rare (a resampling in the adapted order): per row
            spec = self.specs[row_system[r]]
            a = float(self.alphas[r])
            draws.append(self._draw(self.logp[r : r + 1], a, spec))
        return _cat(draws)

    def reorder(self, index: torch.Tensor, counts: Sequence[int],
                last: torch.Tensor | None = None) -> None:
        if self.pending is None:
            raise RuntimeError("LMParticles.reorder before the first advance")
        n = self.pending.shape[0]
        if index.shape[0] != n or not torch.equal(index, torch.arange(n, device=index.device)):
            lo_old, lo_new, k, segments = 0, 0, 0, []
            for seg, rows in zip(self.segments, self._segment_rows(), strict=True):
                new_rows = sum(int(c) for c in counts[k : k + seg.systems])
                kept = sum(int(c) > 0 for c in counts[k : k + seg.systems])
                k += seg.systems
                if new_rows:  # a segment's rows only ever copy rows of the same segment
                    sub = index[lo_new : lo_new + new_rows] - lo_old
                    if sub.shape[0] != rows or not torch.equal(
                            sub, torch.arange(rows, device=sub.device)):
                        self.model.reorder(seg.state, sub)
                    segments.append(_Segment(seg.state, kept))
                lo_old, lo_new = lo_old + rows, lo_new + new_rows
            self.segments = segments  # an empty segment is dropped, its cache freed
            self.pending = self.pending[index]
            self.logp = None  # recomputed by the next forward
        if last is not None:
            self.pending = last
        keep = [k for k, c in enumerate(counts) if c > 0]
        self.specs = [self.specs[k] for k in keep]
        self.counts = [int(counts[k]) for k in keep]
        if not self.counts:  # the batch is empty
            self.segments, self.logp, self.pending = [], None, None

    def close(self) -> None:
        self.segments, self.logp, self.pending = [], None, None
        self.specs, self.counts, self.joining = [], [], []
        self.runs, self.plan = [], None
        self.failed = {}

    def _row_system(self) -> list[int]:
        return [k for k, c in enumerate(self.counts) for _ in range(c)]

    def _draw_all(self, alphas: Sequence[float]) -> Draw:
        """One draw per row: the default-proposal systems in one pass, the others apart."""
        assert self.logp is not None
        if len(self.counts) == 1:
            self.alphas = torch.full((self.counts[0],), float(alphas[0]), dtype=torch.float64)
        else:
            self.alphas = torch.repeat_interleave(torch.tensor(alphas, dtype=torch.float64),
                                                  torch.tensor(self.counts))
        plain = [s.adaptable and not s.truncating for s in self.specs]
        if all(plain):
            u = torch.cat([_uniforms(c, s.generator) for c, s in zip(self.counts, self.specs,
                                                                      strict=True)])
            return self._draw(self.logp, self.alphas, None, u)
        draws, lo = [], 0
        for c, s, a in zip(self.counts, self.specs, alphas, strict=True):
            draws.append(self._draw(self.logp[lo : lo + c], a, s))
            lo += c
        return _cat(draws)

    def _draw(self, logp: torch.Tensor, alpha_t: float | torch.Tensor, spec: DrawSpec | None,
              u: torch.Tensor | None = None) -> Draw:
        """Tokens from the proposal and their weights. Under the default proposal the weight
        alpha_t lp - lq IS log Z_t, computed in the same pass as the draw (eq. 13)."""
        if spec is None or (spec.tau is None and spec.proposal is None):
            if u is None:
                assert spec is not None
                u = _uniforms(logp.shape[0], spec.generator)
            rows_alpha = alpha_t if isinstance(alpha_t, torch.Tensor) else torch.full(
                (logp.shape[0],), float(alpha_t), dtype=torch.float64)
            tok, log_norm = sample_tempered(logp, rows_alpha.to(logp.device), u.to(logp.device))
            lp = logp.gather(1, tok[:, None]).squeeze(1).double()
            return Draw(tok, lp, log_norm, log_norm)
        a = float(alpha_t)
        if spec.proposal is None:
            assert spec.tau is not None
            inv_tau = 1.0 / spec.tau
            tok, log_norm = sample_tempered(logp, inv_tau, _uniforms(logp.shape[0],
                                                                      spec.generator))
            lp = logp.gather(1, tok[:, None]).squeeze(1).double()
            incr = a * lp - (inv_tau * lp - log_norm)
        else:
            logq = spec.proposal(logp, a)
            tok, _ = sample_tempered(logq, 1.0, _uniforms(logp.shape[0], spec.generator))
            lp = logp.gather(1, tok[:, None]).squeeze(1).double()
            incr = a * lp - logq.gather(1, tok[:, None]).squeeze(1).double()
        return Draw(tok, lp, incr, log_power_normalizer(logp, a))


def _uniforms(rows: int, generator: torch.Generator) -> torch.Tensor:
    """The float64 uniforms of `rows` token draws, from one system's own generator."""
    return torch.rand(rows, generator=generator, dtype=torch.float64,
                      device=generator.device)


def _cat(draws: Sequence[Draw]) -> Draw:
    if len(draws) == 1:
        return draws[0]
    return Draw(*(torch.cat([getattr(d, f) for d in draws])
                  for f in ("tokens", "logp", "incr", "log_z")))


def particle_engine(model: Any) -> ParticleEngine:
    """The engine the shared loop drives for `model`: its own (`model.particle_engine`, e.g.
    vLLM) or `LMParticles` over its log-probs."""
    native = getattr(model, "particle_engine", None)
    return native() if native is not None else LMParticles(model)
