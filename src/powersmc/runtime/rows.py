"""A `Continue` request's rows in the scheduler's batch: drawn from its proposal, recorded, and
retired one by one as they end (EOS or `max_tokens`), as the systems' particles are.

The proposal maps onto the engine's draw (`DrawSpec`): a plain temperature is the default
proposal at the constant exponent 1/tau (q proportional to p^(1/tau), eq. 3), drawn in the
engine's fused pass; a nucleus or greedy draw is a proposal callable (`NucleusProposal`,
`ArgmaxProposal`), or the engine's native equivalent. The engine reports, per row, log p and
the incremental weight a log p - log q at the exponent a it was given, so log q is recovered
exactly as a log p - incr.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from powersmc.backends.engine import Draw, DrawSpec, ParticleEngine
from powersmc.methods.program import Continue, Rows
from powersmc.proposals import ArgmaxProposal, NucleusProposal
from powersmc.results import Cost
from powersmc.weights import log_power_normalizer, shannon_entropy


@dataclass
class Ended:
    """Which of a request's live rows ended at this step (device, then host)."""

    finished: torch.Tensor  # bool [live rows]


class RowGroup:
    """The rows of one `Continue` (see the module docstring)."""

    def __init__(self, req: Continue, dev: torch.device, eos: torch.Tensor) -> None:
        self.req, self.ids, self.eos = req, list(req.ids), eos
        n, k = req.rows, req.max_tokens
        self.tokens = torch.zeros((n, k), dtype=torch.long, device=dev)
        self.lp = torch.zeros((n, k), dtype=torch.float64, device=dev)
        self.lq = torch.zeros_like(self.lp)
        self.lengths = torch.zeros(n, dtype=torch.long, device=dev)
        self.finished = torch.zeros(n, dtype=torch.bool, device=dev)
        self.alive = np.arange(n)
        self.alive_dev = torch.from_numpy(self.alive).to(dev)
        self.t = 0
        self.first_logp: torch.Tensor | None = None
        self.zeta_at = torch.tensor(req.zeta_alphas, dtype=torch.float64, device=dev)[:, None]
        self.zeta = torch.zeros((n, k, len(req.zeta_alphas)), dtype=torch.float64, device=dev)
        self.ent = torch.zeros((n, k if req.entropy else 0), dtype=torch.float64, device=dev)
        self.cost = Cost(forward_passes=1, prefill_tokens=len(self.ids))
        self.started = 0.0
        self.run: Any = None  # the program it belongs to (set by the scheduler)

    @property
    def n(self) -> int:
        return self.req.rows

    @property
    def rows(self) -> int:
        return int(self.alive.size)

    @property
    def budget(self) -> int:
        return self.req.rows * self.req.max_tokens

    def prefixes(self) -> None:
        return None

    def spec(self, fork_block: int) -> DrawSpec:
        r = self.req
        if r.greedy:
            return DrawSpec(r.generator, proposal=ArgmaxProposal())
        if r.top_k is not None or (r.top_p is not None and r.top_p < 1):
            return DrawSpec(r.generator, proposal=NucleusProposal(r.tau, r.top_k, r.top_p))
        return DrawSpec(r.generator)  # the default proposal at exponent 1/tau

    def next_alpha(self) -> float:
        return 1.0 / self.req.tau

    def weigh(self, draw: Draw, alpha: float, engine: ParticleEngine, row0: int) -> Ended:
        t = self.t
        self.t += 1
        if t == 0 and self.req.keep_logp:
            self.first_logp = engine.logprobs(row0, row0 + 1)[0].clone()
        live = self.alive_dev
        self.tokens[live, t] = draw.tokens
        self.lp[live, t] = draw.logp
        self.lq[live, t] = alpha * draw.logp - draw.incr
        self.lengths[live] = t + 1
        if self.req.zeta_alphas or self.req.entropy:
            logp = engine.logprobs(row0, row0 + self.rows).double()
            if self.req.zeta_alphas:  # every exponent in one pass: [rows, exponents]
                self.zeta[live, t] = log_power_normalizer(logp[:, None, :], self.zeta_at)
            if self.req.entropy:
                self.ent[live, t] = shannon_entropy(logp)
        done = torch.isin(draw.tokens, self.eos)
        self.finished[live] = done
        return Ended(done)

    def settle(self, e: Ended, engine: ParticleEngine, draw: Draw,
               row0: int) -> tuple[np.ndarray, torch.Tensor | None]:
        """The batch rows (global) that go on: those not ended, unless `max_tokens` is
        reached."""
        keep = np.flatnonzero(~e.finished.numpy())
        if keep.size == 0 or self.t == self.req.max_tokens:
            return np.zeros(0, dtype=np.int64), None
        self.alive = self.alive[keep]
        self.alive_dev = torch.from_numpy(self.alive).to(self.tokens.device)
        self.cost.add_step(int(keep.size))
        return keep + row0, None

    def outcome(self, model: object) -> Rows:
        lens = self.lengths.tolist()
        cut = [row[:n] for row, n in zip(self.tokens.tolist(), lens, strict=True)]
        lp = [row[:n] for row, n in zip(self.lp.tolist(), lens, strict=True)]
        lq = [row[:n] for row, n in zip(self.lq.tolist(), lens, strict=True)]
        zeta = ([row[:n] for row, n in zip(self.zeta.tolist(), lens, strict=True)]
                if self.req.zeta_alphas else [])
        ent = ([row[:n] for row, n in zip(self.ent.tolist(), lens, strict=True)]
               if self.req.entropy else [])
        self.cost.seconds = time.perf_counter() - self.started
        return Rows(cut, lp, lq, self.finished.tolist(), self.first_logp, zeta, ent)
