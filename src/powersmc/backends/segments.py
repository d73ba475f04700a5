"""Where `LMParticles`' rows live: the live systems' rows in one or more model states
(segments; on llama.cpp, contexts), each holding a run of consecutive systems.

A model state holds at most `model.max_rows` rows (llama.cpp: a context's 256 sequences) and
may be a fixed-size cache (`model.fits`). A joining system goes to the newest segment while it
fits there, else it opens a new one (a fresh context, sized for every live and joining row);
the old one takes no new system: it drains as its systems finish and is freed when empty. A
step makes one forward per segment: 32 systems of 16 rows run as two contexts of 256 rows. At
most `max_states` segments live at once; a system that would open one more waits (`room`).
Where each joiner goes is planned at admission (`_place`), so `room` and the prefill agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from powersmc.backends.engine import DrawSpec
from powersmc.backends.protocol import LanguageModel


@dataclass
class Joiner:
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
class Segment:
    """One model state holding the rows of a run of consecutive live systems."""

    state: Any
    systems: int  # how many of the live systems, in row order, it holds


class Segments:
    """The live systems (rows and draw spec each, in row order) and the model states holding
    their rows (see the module docstring)."""

    max_states = 3  # segments (llama.cpp contexts) alive at once: two full, one draining

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.list: list[Segment] = []
        self.specs: list[DrawSpec] = []  # per live system, in row order
        self.counts: list[int] = []  # rows per live system
        self.joining: list[Joiner] = []
        self.runs: list[tuple[int, int, bool]] = []  # the joiners' runs (lo, hi, opens one)
        self.plan: _Plan | None = None  # where the next joiner goes

    def room(self, prompt_len: int, rows: int, budget: int) -> bool:
        """Whether a request's rows fit without opening more than `max_states` segments."""
        trial = replace(self._planned())
        opens = self._place(trial, rows, prompt_len + -(-budget // rows) + 1)
        return not opens or len(self.list) + trial.opened <= self.max_states

    def add(self, j: Joiner) -> None:
        """Plan a joiner into a segment; it is prefilled at the next `prefill`."""
        new, k = self._place(self._planned(), j.rows, j.length), len(self.joining)
        if not new and self.runs and self.joining[-1].per == j.per:
            self.runs[-1] = (self.runs[-1][0], k + 1, self.runs[-1][2])
        else:
            self.runs.append((k, k + 1, new))
        self.joining.append(j)

    def _planned(self) -> _Plan:
        """The plan of this step's joiners so far (a fresh one before the first)."""
        if self.plan is None or not self.joining:
            held = self.rows()[-1] if self.list else 0
            self.plan = _Plan(self.list[-1].state if self.list else None, held, held, 0)
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

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Append each live row's token (row order): one model step per segment."""
        out, lo = [], 0
        for seg, rows in zip(self.list, self.rows(), strict=True):
            out.append(self.model.step(seg.state, tokens[lo : lo + rows]))
            lo += rows
        return out

    def prefill(self) -> tuple[list[torch.Tensor], dict[int, Exception]]:
        """Evaluate the joiners' prompts into their planned segments (`runs`: consecutive
        joiners with equal rows per prompt, each prefilled in one call, into the newest
        segment or one they open) and register them. Returns the logp per run, and the
        joiners (by place) whose prefill failed: if a run's call fails, its systems are
        retried one by one so that only the failing one is left out."""
        out: list[torch.Tensor] = []
        joining, failed = self.joining, {}
        for lo, hi, new in self.runs:
            try:
                out.append(self._join(joining[lo:hi], joining[lo:], new))
            except Exception as exc:  # noqa: BLE001 - find the system(s) that fail
                if hi - lo == 1:
                    failed[lo] = exc
                    continue
                opened = not new  # the segment the run goes to exists
                for i in range(lo, hi):
                    try:
                        out.append(self._join(joining[i : i + 1], joining[i:], not opened))
                        opened = True
                    except Exception as one:  # noqa: BLE001 - it alone does not join
                        failed[i] = one
        self.joining, self.runs, self.plan = [], [], None
        return out, failed

    def _join(self, group: list[Joiner], rest: list[Joiner], new: bool) -> torch.Tensor:
        """Prefill one group of joiners (equal rows per prompt) into the newest segment or
        (`new`) a new one sized for every live and joining row (it takes the next joiners
        while the others drain); register them and return their logp."""
        rows, budget = group[0].per, sum(j.budget for j in group)
        prompts = [p for j in group for p in j.prompts]
        if new or not self.list:
            want = sum(self.counts) + sum(j.rows for j in rest)
            if self.model.max_rows is not None:
                want = min(want, self.model.max_rows)
            state, logp = self.model.prefill_many(prompts, rows, budget=budget,
                                                  room=(want, max(j.length for j in rest)))
            self.list.append(Segment(state, 0))
        else:
            logp = self.model.extend(self.list[-1].state, prompts, rows, budget=budget)
        self.list[-1].systems += len(group)
        for j in group:
            self.specs.append(j.spec)
            self.counts.append(j.rows)
        return logp

    def rows(self) -> list[int]:
        """Live rows per segment."""
        out, k = [], 0
        for seg in self.list:
            out.append(sum(self.counts[k : k + seg.systems]))
            k += seg.systems
        return out

    def reorder(self, index: torch.Tensor, counts: Sequence[int]) -> None:
        """Row k becomes old row index[k]; `counts`: each live system's rows afterwards (0:
        it leaves). A segment's rows only ever copy rows of the same segment; an emptied
        segment is dropped, its state freed."""
        lo_old, lo_new, k, kept_segments = 0, 0, 0, []
        for seg, rows in zip(self.list, self.rows(), strict=True):
            new_rows = sum(int(c) for c in counts[k : k + seg.systems])
            kept = sum(int(c) > 0 for c in counts[k : k + seg.systems])
            k += seg.systems
            if new_rows:
                sub = index[lo_new : lo_new + new_rows] - lo_old
                if sub.shape[0] != rows or not torch.equal(
                        sub, torch.arange(rows, device=sub.device)):
                    self.model.reorder(seg.state, sub)
                kept_segments.append(Segment(seg.state, kept))
            lo_old, lo_new = lo_old + rows, lo_new + new_rows
        self.list = kept_segments

    def retire(self, counts: Sequence[int]) -> None:
        """Keep the systems `counts` gives rows (after `reorder`)."""
        keep = [k for k, c in enumerate(counts) if c > 0]
        self.specs = [self.specs[k] for k in keep]
        self.counts = [int(counts[k]) for k in keep]
        if not self.counts:
            self.list = []

    def cells_in_use(self) -> int | None:
        used = [self.model.cells_in_use(s.state) for s in self.list]
        return sum(u for u in used if u is not None) if None not in used else None

    def clear(self) -> None:
        self.list, self.specs, self.counts, self.joining = [], [], [], []
        self.runs, self.plan = [], None
