"""The one batched decode loop every non-SMC method builds on.

`rollout` advances a batch of rows from a backend state by sampling from a proposal, recording
per-token log p (the model) and log q (the proposal), and lets finished rows leave the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from powersmc.backends.protocol import LanguageModel
from powersmc.results import Cost

# logp [rows, V] -> (logp used as the model, logq of the proposal); both normalized.
TokenRule = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def temperature_rule(tau: float, top_k: int | None = None) -> TokenRule:
    """Sample at temperature tau from the full model (or from its top-k, as a proposal only)."""
    from powersmc.proposals import truncate_logprobs

    def rule(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = torch.log_softmax(logp / tau, -1)
        return logp, (truncate_logprobs(scaled, top_k=top_k) if top_k else scaled)

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
        logp_m, logq = rule(logp)
        if greedy:
            tok = logq.argmax(-1)
        else:
            tok = torch.multinomial(logq.exp(), 1, generator=generator).squeeze(1)
        tokens[live, t] = tok
        lp_all[live, t] = logp_m.gather(1, tok[:, None]).squeeze(1).double()
        lq_all[live, t] = logq.gather(1, tok[:, None]).squeeze(1).double()
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
