"""The baselines' `Decoder` on vLLM: each continuation is one request, prompt + kept prefix.

The prompt is computed by the first request that holds it; every later request over the same
prompt (MH's moves, its block extensions) reuses its KV blocks through prefix caching, which
recomputes at most one block. Per token the request records the raw log p (vLLM's output) and
log q = log p / tau - log sum_v p(v)^(1/tau) (the processor's log_norm, over the top-k /
top-p set when the rule truncates the proposal). Rows stop at an EOS id of ours or at
`max_tokens`. Costs follow `LMDecoder`'s accounting: the prompt once, then one token-eval per
live row per step, the first step of a kept prefix included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from powersmc.backends import vllm_processor as vp
from powersmc.backends.decoder import Rollout, TemperatureRule
from powersmc.results import Cost


class VllmDecoder:
    """`backends.decoder.Decoder` over a `VllmLM` (see the module docstring)."""

    def __init__(self, lm: Any) -> None:  # a VllmLM (not imported: it builds this class)
        self.lm, self.device = lm, torch.device("cpu")
        self.prompt: list[int] = []

    def start(self, prompt_ids: Sequence[int], rows: int, *, budget: int, cost: Cost) -> None:
        self.prompt = [int(i) for i in prompt_ids]
        cost.add_prefill(len(self.prompt))

    def sample(self, rows: int, max_tokens: int, rule: TemperatureRule,
               generator: torch.Generator | None, cost: Cost, *, prefix: Sequence[int] = (),
               source: Any = None, consume: bool = False, greedy: bool = False) -> Rollout:
        inv_tau = 1.0 / rule.tau
        spec = vp.Spec(alpha=inv_tau, inv_tau=inv_tau, proposal_top_k=rule.top_k,
                       proposal_top_p=rule.top_p)
        gid = self.lm.group(spec)
        start = self.prompt + [int(i) for i in prefix]
        gen = generator if generator is not None else torch.Generator()
        reqs = [self.lm.submit(gid, start, seed=int(torch.randint(0, 2**62, (1,), generator=gen)),
                               max_tokens=max_tokens, stop=True, greedy=greedy)
                for _ in range(rows)]
        row_of = {r: i for i, r in enumerate(reqs)}
        tokens = torch.zeros((rows, max_tokens), dtype=torch.long)
        lp_all = torch.zeros((rows, max_tokens), dtype=torch.float64)
        lq_all = torch.zeros_like(lp_all)
        lengths = torch.zeros(rows, dtype=torch.long)
        finished = torch.zeros(rows, dtype=torch.bool)
        eos = set(self.lm.eos_token_ids)
        left = rows
        try:
            while left:
                produced = self.lm.step()
                # a row's first token comes from the prompt's computation, unless a kept prefix
                # had to be fed first (as LMDecoder counts)
                evals = sum(1 for t in produced if prefix or lengths[row_of[t.request]] > 0)
                if evals:
                    cost.add_step(evals)
                for t in produced:
                    i = row_of[t.request]
                    n = int(lengths[i])
                    tokens[i, n] = t.token
                    lp_all[i, n] = t.logp
                    lq_all[i, n] = inv_tau * t.logp - t.values.log_norm
                    lengths[i] = n + 1
                    finished[i] = t.token in eos
                    left -= t.finished
        finally:
            self.lm.release(gid, reqs)
        return Rollout(tokens, lp_all, lq_all, lengths, finished, None)
