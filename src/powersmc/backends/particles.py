"""`LMParticles`: the engine (`backends.engine.ParticleEngine`) of every backend that returns
next-token log-probabilities (`LanguageModel`: Transformers, llama.cpp, toy models): tokens are
drawn here from the model's log-probs; `particle_engine` picks a model's engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from powersmc.backends.engine import Draw, DrawSpec, ParticleEngine
from powersmc.backends.protocol import LanguageModel
from powersmc.backends.segments import Joiner, Segment, Segments
from powersmc.proposals import sample_tempered, truncate_logprobs
from powersmc.weights import log_power_normalizer


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

    Where the rows live (`backends.segments.Segments`): in one model state, or, past a
    state's row limit or a fixed-size cache's room (llama.cpp: a context of 256 rows), in
    several, one forward each; at most three at once.
    """

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.device = model.device
        self.fork_block = 1  # rows are copied with their cache, at any length
        self.max_rows = model.max_rows  # one request's rows share one state
        self.joins_running = model.joins_running
        self.rows = Segments(model)  # the live systems and the states holding their rows
        self.logp: torch.Tensor | None = None  # next-token log p of the rows, if computed
        self.pending: torch.Tensor | None = None  # tokens drawn but not yet fed to the model
        self.alphas: torch.Tensor | None = None  # per-row exponent of the last draw
        self.failed: dict[int, Exception] = {}  # joiners whose prefill failed (by place)

    @property
    def segments(self) -> list[Segment]:
        return self.rows.list

    @property
    def counts(self) -> list[int]:
        """Rows per live system, in row order."""
        return self.rows.counts

    @property
    def specs(self) -> list[DrawSpec]:
        return self.rows.specs

    @property
    def state(self) -> Any:
        """The model state of the newest segment (None when the batch is empty)."""
        return self.segments[-1].state if self.segments else None

    def room(self, prompt_len: int, rows: int, budget: int) -> bool:
        """An empty engine: yes. Else, where the model joins running batches: whether the
        request's rows fit without opening more than `Segments.max_states` states."""
        if not (self.counts or self.rows.joining):
            return True
        return self.joins_running and self.rows.room(prompt_len, rows, budget)

    def admit(self, prompt: Sequence[int], rows: int, spec: DrawSpec, *, budget: int,
              prefixes: Sequence[Sequence[int]] | None = None) -> None:
        head = [int(i) for i in prompt]
        if prefixes is None:
            self.rows.add(Joiner([head], rows, spec, budget))
        else:
            self.rows.add(Joiner([head + [int(i) for i in p] for p in prefixes], 1, spec,
                                 budget))

    def advance(self, alphas: Sequence[float]) -> Draw:
        """See `ParticleEngine.advance`; a joining system whose prompt fails to evaluate is
        left out (listed in `failed` with its error, by its place among the joiners)."""
        parts = []
        if self.pending is not None:
            with record_function("powersmc.forward"):
                parts = self.rows.forward(self.pending)
        joiners, self.failed = len(self.rows.joining), {}
        if joiners:
            with record_function("powersmc.prefill"):
                joined, self.failed = self.rows.prefill()
            parts += joined
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

    def logprobs(self, lo: int, hi: int) -> torch.Tensor:
        assert self.logp is not None
        return self.logp[lo:hi]

    def cells_in_use(self) -> int | None:
        return self.rows.cells_in_use()

    def redraw(self, rows: torch.Tensor) -> Draw:
        """Each run of rows of one system in one draw, from its generator in row order (the
        uniforms of one call equal those of as many calls of one)."""
        assert self.logp is not None and self.alphas is not None
        at = rows.cpu().numpy()
        system = np.searchsorted(np.cumsum(self.counts), at, side="right")
        cuts = [0, *(np.flatnonzero(system[1:] != system[:-1]) + 1).tolist(), at.size]
        return _cat([self._draw(self.logp[rows[lo:hi]], float(self.alphas[int(at[lo])]),
                                self.specs[int(system[lo])])
                     for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)])

    def reorder(self, index: torch.Tensor, counts: Sequence[int],
                last: torch.Tensor | None = None) -> None:
        if self.pending is None:
            raise RuntimeError("LMParticles.reorder before the first advance")
        n = self.pending.shape[0]
        if index.shape[0] != n or not torch.equal(index, torch.arange(n, device=index.device)):
            self.rows.reorder(index, counts)
            self.pending = self.pending[index]
            self.logp = None  # recomputed by the next forward
        if last is not None:
            self.pending = last
        self.rows.retire(counts)
        if not self.counts:  # the batch is empty
            self.logp, self.pending = None, None

    def close(self) -> None:
        self.rows.clear()
        self.logp, self.pending, self.failed = None, None, {}

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
