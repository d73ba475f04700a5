"""The one batched decode loop every non-SMC method builds on, and the generic `Decoder`.

`rollout` advances a batch of rows from a backend state by sampling from a proposal, recording
per-token log p (the model) and log q (the proposal), and lets finished rows leave the batch.

The baselines (plain / low-temperature / greedy decoding, best-of-N, MH) reach a backend
through a `Decoder`: "start a prompt, then sample continuations of it or of a kept prefix at
temperature tau". `LMDecoder` serves every `LanguageModel` (one prefill, KV-cache forks for
kept prefixes, `rollout`); an engine that samples itself (vLLM) brings its own
(`model.decoder()`). `decoder(model)` picks. The protocol, the token rule and `Rollout` live
in `backends.decoder` (a backend's decoder implements them without importing methods); they are
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from powersmc.backends.decoder import Decoder, Rollout, TemperatureRule, TokenRule
from powersmc.backends.protocol import LanguageModel
from powersmc.results import Cost

__all__ = ["Decoder", "LMDecoder", "Rollout", "TemperatureRule", "TokenRule", "decoder",
           "rollout", "sample_rows"]

class LMDecoder:
    """`Decoder` over a `LanguageModel`: the prompt is prefilled once; a kept prefix continues
    from a fork of its source's KV cache (`model.fork`), never from a new prefill."""

    def __init__(self, model: LanguageModel) -> None:
        self.model, self.device = model, model.device
        self.root: Any = None
        self.root_logp: torch.Tensor | None = None

    def start(self, prompt_ids: Sequence[int], rows: int, *, budget: int, cost: Cost) -> None:
        self.root, self.root_logp = self.model.prefill(prompt_ids, rows, budget=budget)
        cost.add_prefill(len(prompt_ids))

    def sample(self, rows: int, max_tokens: int, rule: TemperatureRule,
               generator: torch.Generator | None, cost: Cost, *, prefix: Sequence[int] = (),
               source: Any = None, consume: bool = False, greedy: bool = False) -> Rollout:
        m = self.model
        if not prefix:
            if self.root_logp is None:
                raise RuntimeError("LMDecoder.sample before start")
            state = self.root if consume else m.fork(self.root)
            logp = self.root_logp
        else:
            state = source if consume else m.fork(source, keep=len(prefix) - 1)
            logp = m.step(state, torch.tensor([int(prefix[-1])], device=self.device))
            cost.add_step(logp.shape[0])
        if logp.shape[0] != rows:
            m.reorder(state, torch.zeros(rows, dtype=torch.long, device=self.device))
            logp = logp[:1].expand(rows, -1)
        return rollout(m, state, logp, max_tokens, rule, generator, cost, greedy=greedy)


def decoder(model: Any) -> Decoder:
    """The `Decoder` for `model`: its own (`model.decoder()`, e.g. vLLM) or `LMDecoder`."""
    native = getattr(model, "decoder", None)
    return native() if native is not None else LMDecoder(model)


def sample_rows(model: Any, prompt_ids: list[int], rows: int, max_new_tokens: int,
                rule: TemperatureRule, generator: torch.Generator | None,
                greedy: bool = False) -> tuple[Rollout, Cost]:
    """`rows` independent continuations of one prompt (computed once), by `rule`; the cost
    accounts the prompt and every step, and its seconds the whole call."""
    cost, start = Cost(), time.perf_counter()
    dec = decoder(model)
    dec.start(prompt_ids, rows, budget=rows * max_new_tokens, cost=cost)
    out = dec.sample(rows, max_new_tokens, rule, generator, cost, consume=True, greedy=greedy)
    cost.seconds = time.perf_counter() - start
    return out, cost


def rollout(
    model: LanguageModel,
    state: Any,
    logp: torch.Tensor,
    max_steps: int,
    rule: TokenRule,
    generator: torch.Generator | None,
    cost: Cost,
    greedy: bool = False,
) -> Rollout:
    """Sample up to `max_steps` tokens for each row of `state` (whose next-token log-probs are
    `logp`); rows stop at an EOS id. One forward pass per step over the live rows."""
    dev = model.device
    rows = logp.shape[0]
    tokens = torch.zeros((rows, max_steps), dtype=torch.long, device=dev)
    lp_all = torch.zeros((rows, max_steps), dtype=torch.float64, device=dev)
    lq_all = torch.zeros_like(lp_all)
    lengths = torch.zeros(rows, dtype=torch.long, device=dev)
    finished = torch.zeros(rows, dtype=torch.bool, device=dev)
    eos = torch.tensor(model.eos_token_ids, dtype=torch.long, device=dev)
    live = torch.arange(rows, device=dev)
    for t in range(max_steps):
        tok, lp, lq = rule(logp, generator, greedy)
        tokens[live, t] = tok
        lp_all[live, t] = lp
        lq_all[live, t] = lq
        lengths[live] = t + 1
        done = torch.isin(tok, eos)
        finished[live] = done
        if t == max_steps - 1:
            break
        keep = (~done).nonzero().squeeze(1)  # host sync: how many rows go on
        if keep.numel() == 0:
            break
        if keep.numel() != live.numel():
            model.reorder(state, keep)
            live, tok = live[keep], tok[keep]
        logp = model.step(state, tok)
        cost.add_step(live.numel())
    return Rollout(tokens, lp_all, lq_all, lengths, finished, state)
