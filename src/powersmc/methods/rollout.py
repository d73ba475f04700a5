"""The one batched decode loop every non-SMC method builds on.

`rollout` advances a batch of rows from a backend state by sampling from a proposal, recording
per-token log p (the model) and log q (the proposal), and lets finished rows leave the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from powersmc.backends.protocol import LanguageModel
from powersmc.results import Cost

# (logp [rows, V], generator, greedy) -> (tokens, log p of each, log q of each); log p is the
# model's (normalized over the full vocabulary), log q the proposal's that drew the token.
TokenRule = Callable[[torch.Tensor, torch.Generator | None, bool],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def temperature_rule(tau: float, top_k: int | None = None,
                     top_p: float | None = None) -> TokenRule:
    """Sample at temperature tau from the full model, or from its top-k / top-p nucleus after
    the temperature (then only a proposal: log p stays the full model's).

    Greedy takes the argmax (the same token at every temperature)."""
    from powersmc.proposals import sample_tempered, truncate_logprobs

    def rule(logp: torch.Tensor, gen: torch.Generator | None,
             greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        truncating = top_k or (top_p is not None and top_p < 1)
        if truncating or greedy:
            logq = torch.log_softmax(logp / tau, -1)
            if truncating:
                logq = truncate_logprobs(logq, top_k=top_k, top_p=top_p)
            tok = logq.argmax(-1) if greedy else sample_tempered(logq, 1.0, gen)[0]
            lq = logq.gather(1, tok[:, None]).squeeze(1).double()
            return tok, logp.gather(1, tok[:, None]).squeeze(1).double(), lq
        tok, log_norm = sample_tempered(logp, 1.0 / tau, gen)  # one fused pass (eq. 3)
        lp = logp.gather(1, tok[:, None]).squeeze(1).double()
        return tok, lp, lp / tau - log_norm

    return rule


@dataclass
class Rollout:
    """Per row: sampled tokens, their log p and log q, length, and whether EOS was emitted.

    `state` holds every row's prompt and tokens except each row's last sampled token, which was
    not fed (feed it with `model.step` to continue). Only meaningful for rows=1 callers when
    rows finish at different times, since finished rows are dropped from it.
    """

    tokens: torch.Tensor
    logp: torch.Tensor
    logq: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    state: Any

    def sequences(self) -> list[list[int]]:
        """Each row's sampled ids, cut at its length (EOS included when emitted)."""
        lens, rows = self.lengths.tolist(), self.tokens.tolist()
        return [row[:n] for row, n in zip(rows, lens, strict=True)]


def sample_rows(model: LanguageModel, prompt_ids: list[int], rows: int, max_new_tokens: int,
                rule: TokenRule, generator: torch.Generator | None,
                greedy: bool = False) -> tuple[Rollout, Cost]:
    """`rows` independent continuations of one prompt (prefilled once), by `rule`; the cost
    accounts the prefill and every step, and its seconds the whole call."""
    cost, start = Cost(), time.perf_counter()
    state, logp = model.prefill(prompt_ids, rows, budget=rows * max_new_tokens)
    cost.add_prefill(len(prompt_ids))
    out = rollout(model, state, logp, max_new_tokens, rule, generator, cost, greedy=greedy)
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
