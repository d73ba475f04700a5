"""Power-SMC's `ParticleEngine` on vLLM: every live particle is one running vLLM request.

* `advance` sets the processor's spec for this step (alpha_t, tau), submits the rows that
  have no running request (re-submission: prompt + the row's tokens as a token prompt; prefix
  caching recomputes 1 .. `fork_block` tokens of it: only whole KV blocks are cached, and
  exactly one when the length is 1 mod the block, where `resample_align='block'` puts every
  resampling), and steps the engine until every live row has
  produced exactly one token. A row that produced its token while others still wait (the
  step's token budget was exceeded) is aborted at once and re-submitted at the next `advance`,
  so no row ever runs ahead.
* `reorder` keeps a row's request for its first copy (when its newest token stands), marks
  further copies and replaced tokens for re-submission, and aborts the requests of rows no
  particle continues (finished particles, dropped lineages): they cost nothing after that.
* Weights: the processor's log Z_t (eq. 11) is the incremental weight under the default
  proposal (eq. 8, Theorem 1); with a fixed tau, alpha_t log p~ - log q of the sampled token.
  Draw.logp is the target's log p~ (raw log p minus the truncation's shift).
* Seeds: each request gets a seed drawn from the run's generator, in row order, so a seeded
  run reproduces.
* Fully adapted order: with `start(..., redraws=True)` the processor also draws N - 1 more
  tokens per row from the same q, with a generator seeded from the run's; `redraw` hands
  them out (a row copied k times needs k - 1 of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.profiler import record_function

from powersmc.backends import vllm_processor as vp
from powersmc.backends.particles import Draw
from powersmc.errors import InputError


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


class VllmParticles:
    """Live particles of P prompts x N rows as vLLM requests (see the module docstring)."""

    def __init__(self, lm: Any, generator: torch.Generator, *, tau: float | None = None,
                 proposal=None, top_k: int | None = None, top_p: float | None = None) -> None:
        if proposal is not None:
            raise InputError("proposal", "None on the vLLM backend (vLLM draws the tokens, from "
                             "the power proposal or a fixed tau=)", type(proposal).__name__)
        self.lm, self.gen, self.tau = lm, generator, tau
        self.spec = vp.Spec(top_k=top_k, top_p=top_p)
        self.device = torch.device("cpu")
        self.fork_block = lm.block_size  # prefix caching reuses whole KV blocks only
        self.gid: str | None = None
        self.seqs: list[list[int]] = []  # per row: prompt + generated tokens
        self.reqs: list[str | None] = []  # per row: its running request, or None
        self.last: list[Any] = []  # per row: what its newest token came with
        self.used: list[int] = []  # per row: extra draws handed out since the last advance

    @property
    def adaptable(self) -> bool:
        return self.tau is None

    def start(self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int,
              redraws: bool = False) -> None:
        self.spec.extra = rows - 1 if redraws else 0
        self.spec.seed = _seed(self.gen)
        self.gid = self.lm.group(self.spec)
        self.seqs = [list(p) for p in prompts for _ in range(rows)]
        self.reqs = [None] * len(self.seqs)

    def advance(self, alpha_t: float) -> Draw:
        self.spec.alpha = alpha_t
        self.spec.inv_tau = alpha_t if self.tau is None else 1.0 / self.tau
        for i, seq in enumerate(self.seqs):
            if self.reqs[i] is None:
                self.reqs[i] = self.lm.submit(self.gid, seq, seed=_seed(self.gen))
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
        return self._draw([(t.token, t.logp - t.values.shift, t.values) for t in got])

    def redraw(self, rows: torch.Tensor) -> Draw:
        picks = []
        for i in rows.tolist():
            v = self.last[i].values
            if self.used[i] >= len(v.extra_tokens):
                raise InputError("order", "'standard' here: this run was started without "
                                 "redraws (start(..., redraws=True))")
            k = self.used[i]
            self.used[i] += 1
            picks.append((v.extra_tokens[k], v.extra_logp[k], v))
        return self._draw(picks)

    def _draw(self, picks: list[tuple[int, float, vp.RowResult]]) -> Draw:
        a = self.spec.alpha
        tokens = torch.tensor([p[0] for p in picks], dtype=torch.long)
        lp = torch.tensor([p[1] for p in picks], dtype=torch.float64)
        log_z = torch.tensor([p[2].log_z for p in picks], dtype=torch.float64)
        if self.tau is None:
            return Draw(tokens, lp, log_z, log_z)
        log_norm = torch.tensor([p[2].log_norm for p in picks], dtype=torch.float64)
        return Draw(tokens, lp, a * lp - (self.spec.inv_tau * lp - log_norm), log_z)

    def reorder(self, index: torch.Tensor, last: torch.Tensor | None = None) -> None:
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

    def close(self) -> None:
        if self.gid is not None:
            self.lm.release(self.gid, [r for r in self.reqs if r is not None])
        self.gid, self.seqs, self.reqs, self.last = None, [], [], []
