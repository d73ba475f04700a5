"""The scheduler's `ParticleEngine` on vLLM: every live row is one running vLLM request.

* Each request of the scheduler (a particle system, a program's continuation rows) is one
  processor group with its own spec (alpha_t, tau, truncation; a program's nucleus proposal
  as the processor's proposal top-k / top-p, greedy as vLLM's temperature 0), and its vLLM
  requests are seeded from its own generator; systems join at any step as new requests
  and leave by aborting theirs, while vLLM's scheduler batches every request of every system.
* `advance` sets each group's spec for this step, submits the rows that have no running
  request (re-submission: prompt + the row's tokens as a token prompt; prefix caching
  recomputes 1 .. `fork_block` tokens of it: only whole KV blocks are cached, and exactly one
  when the length is 1 mod the block, where `resample_align='block'` puts every resampling),
  and steps the engine until every live row has produced exactly one token. A row that
  produced its token while others still wait (the step's token budget was exceeded) is
  aborted at once and re-submitted at the next `advance`, so no row ever runs ahead.
* `reorder` keeps a row's request for its first copy (when its newest token stands), marks
  further copies and replaced tokens for re-submission, and aborts the requests of rows no
  particle continues (finished particles, dropped lineages, systems that left): they cost
  nothing after that.
* Weights: the processor's log Z_t (eq. 11) is the incremental weight under the default
  proposal (eq. 8, Theorem 1); with a fixed tau, alpha_t log p~ - log q of the sampled token.
  Draw.logp is the target's log p~ (raw log p minus the truncation's shift). A greedy row's
  log q is 0.
* Seeds: each request gets a seed drawn from its system's generator, in row order, so a seeded
  system reproduces.
* Fully adapted order: a system admitted with `redraws` has the processor also draw N - 1
  more tokens per row from the same q, with a generator seeded from the system's; `redraw`
  hands them out (a row copied k times needs k - 1 of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from powersmc.backends import vllm_processor as vp
from powersmc.backends.engine import Draw, DrawSpec
from powersmc.errors import InputError
from powersmc.proposals import ArgmaxProposal, NucleusProposal


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


@dataclass
class _Group:
    """One system's processor group: its id, the spec the processor reads, how it draws."""

    gid: str
    spec: vp.Spec
    draw: DrawSpec
    rows: int
    tau: float | None  # a fixed proposal temperature (None: 1/alpha_t, the power proposal)
    greedy: bool


class VllmParticles:
    """Live particles of several systems as vLLM requests (see the module docstring)."""

    joins_running = True
    max_rows = None  # vLLM's own scheduler queues what its KV blocks cannot hold

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.device = torch.device("cpu")
        self.fork_block = lm.block_size  # prefix caching reuses whole KV blocks only
        self.failed: dict[int, Exception] = {}  # a joiner's prompt never fails apart here
        self.groups: list[_Group] = []  # per live system, in row order
        self.seqs: list[list[int]] = []  # per row: prompt + generated tokens
        self.reqs: list[str | None] = []  # per row: its running request, or None
        self.last: list[Any] = []  # per row: what its newest token came with
        self.used: list[int] = []  # per row: extra draws handed out since the last advance

    def room(self, prompt_len: int, rows: int, budget: int) -> bool:
        """Always: vLLM's own scheduler queues the requests its KV blocks cannot hold."""
        return True

    def admit(self, prompt: Sequence[int], rows: int, spec: DrawSpec, *, budget: int,
              prefixes: Sequence[Sequence[int]] | None = None) -> None:
        vspec = vp.Spec(top_k=spec.top_k, top_p=spec.top_p)
        tau, greedy = spec.tau, isinstance(spec.proposal, ArgmaxProposal)
        if isinstance(spec.proposal, NucleusProposal):
            tau = spec.proposal.tau
            vspec.proposal_top_k, vspec.proposal_top_p = spec.proposal.top_k, spec.proposal.top_p
        elif spec.proposal is not None and not greedy:
            raise InputError("proposal", "None on the vLLM backend (vLLM draws the tokens, from "
                             "the power proposal, a fixed tau=, a top-k / top-p nucleus or "
                             "greedily)", type(spec.proposal).__name__)
        vspec.extra = rows - 1 if spec.redraws else 0
        vspec.seed = _seed(spec.generator)
        self.groups.append(_Group(self.lm.group(vspec, exclusive=False), vspec, spec, rows,
                                  1.0 if greedy else tau, greedy))
        self.seqs += ([list(prompt) for _ in range(rows)] if prefixes is None else
                      [list(prompt) + list(p) for p in prefixes])
        self.reqs += [None] * rows

    def _row_groups(self) -> list[_Group]:
        return [g for g in self.groups for _ in range(g.rows)]

    def advance(self, alphas: Sequence[float]) -> Draw:
        for g, a in zip(self.groups, alphas, strict=True):
            g.spec.alpha = a
            g.spec.inv_tau = a if g.tau is None else 1.0 / g.tau
        row_groups = self._row_groups()
        for i, seq in enumerate(self.seqs):
            if self.reqs[i] is None:
                g = row_groups[i]
                self.reqs[i] = self.lm.submit(g.gid, seq, seed=_seed(g.draw.generator),
                                              greedy=g.greedy)
        row_of = {r: i for i, r in enumerate(self.reqs)}
        got: list[Any] = [None] * len(self.seqs)
        waiting = len(self.seqs)
        while waiting:
            with record_function("powersmc.forward"):  # vLLM's step: forward and sampling
                produced = self.lm.step()
            if not produced and not self.lm.engine.has_unfinished_requests():
                raise RuntimeError("vLLM has no request left for rows still waiting")
            for tok in produced:
                i = row_of[tok.request]
                got[i] = tok
                self.seqs[i].append(tok.token)
                waiting -= 1
                if tok.finished:  # the context is full: it ends with this token
                    self.reqs[i] = None
            if waiting:  # hold the rows that are done: re-submitted next step
                ahead = [i for i in (row_of[t.request] for t in produced) if self.reqs[i]]
                self.lm.abort([self.reqs[i] for i in ahead])
                for i in ahead:
                    self.reqs[i] = None
        self.last = got
        self.used = [0] * len(got)
        return self._draw([(t.token, t.logp - t.values.shift, t.values, g)
                           for t, g in zip(got, row_groups, strict=True)])

    def redraw(self, rows: torch.Tensor) -> Draw:
        row_groups = self._row_groups()
        picks = []
        for i in rows.tolist():
            v = self.last[i].values
            if self.used[i] >= len(v.extra_tokens):
                raise InputError("order", "'standard' here: this system was admitted without "
                                 "redraws")
            k = self.used[i]
            self.used[i] += 1
            picks.append((v.extra_tokens[k], v.extra_logp[k], v, row_groups[i]))
        return self._draw(picks)

    @staticmethod
    def _draw(picks: list[tuple[int, float, vp.RowResult, _Group]]) -> Draw:
        tokens = torch.tensor([p[0] for p in picks], dtype=torch.long)
        lp = torch.tensor([p[1] for p in picks], dtype=torch.float64)
        log_z = torch.tensor([p[2].log_z for p in picks], dtype=torch.float64)
        if all(p[3].tau is None for p in picks):
            return Draw(tokens, lp, log_z, log_z)
        a = torch.tensor([p[3].spec.alpha for p in picks], dtype=torch.float64)
        inv_tau = torch.tensor([p[3].spec.inv_tau for p in picks], dtype=torch.float64)
        log_norm = torch.tensor([p[2].log_norm for p in picks], dtype=torch.float64)
        greedy = torch.tensor([p[3].greedy for p in picks])
        log_q = torch.where(greedy, 0.0, inv_tau * lp - log_norm)
        default = torch.tensor([p[3].tau is None for p in picks])
        return Draw(tokens, lp, torch.where(default, log_z, a * lp - log_q), log_z)

    def logprobs(self, lo: int, hi: int) -> torch.Tensor:
        raise InputError("method", "a backend with next-token log-probabilities (transformers, "
                         "llama.cpp): vLLM samples without exposing them")

    def cells_in_use(self) -> int | None:
        return None

    def reorder(self, index: torch.Tensor, counts: Sequence[int],
                last: torch.Tensor | None = None) -> None:
        idx = index.tolist()
        new_last = None if last is None else last.tolist()
        seqs, reqs, kept = [], [], set()
        for k, i in enumerate(idx):
            seq = self.seqs[i]
            tok = seq[-1] if new_last is None else int(new_last[k])
            if i not in kept and self.reqs[i] is not None and tok == seq[-1]:
                kept.add(i)
                seqs.append(seq)
                reqs.append(self.reqs[i])
            else:
                seqs.append(seq[:-1] + [tok])
                reqs.append(None)
        self.lm.abort([r for i, r in enumerate(self.reqs) if r is not None and i not in kept])
        self.seqs, self.reqs = seqs, reqs
        groups = []
        for g, c in zip(self.groups, counts, strict=True):
            if c > 0:
                g.rows = int(c)
                groups.append(g)
            else:
                self.lm.release(g.gid, [])
        self.groups = groups

    def close(self) -> None:
        for g in self.groups:
            self.lm.release(g.gid, [])
        self.lm.abort([r for r in self.reqs if r is not None])
        self.groups, self.seqs, self.reqs, self.last = [], [], [], []
