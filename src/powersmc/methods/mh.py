"""MH power sampling (Karan & Du 2025, "Reasoning with Sampling", arXiv 2510.14901).

The answer grows in K blocks of B tokens; after each block, M Metropolis-Hastings moves each
pick an edit index j, regenerate the suffix y_{j:} from the proposal q (temperature 1/alpha),
and accept with the ratio  [p(y')^alpha q(y_{j:} | y_{<j})] / [p(y)^alpha q(y'_{j:} | y_{<j})]
over the regenerated parts. Two modes:

* ``exact`` (default): a correct MH kernel for pi_alpha truncated at the block's length cap.
  Proposal over the full vocabulary; the whole suffix is regenerated up to the cap (or EOS);
  full-suffix sums of log p and log q; and the index-probability correction L/L' (the edit
  index is uniform over the current length L forward and over L' in reverse). The chain keeps
  moving after an EOS, so its stationary distribution is pi_alpha over sequences of length
  <= max_new_tokens (truncated ones included, as in `smc_sample`).
* ``faithful``: the published procedure and settings, for comparison with their numbers:
  top-k 50 inside the proposal (HF's default in their `generate` call), suffix regenerated
  only up to the current length, the current suffix compared only up to the proposal's length
  when the proposal ends early, no index correction, early return after a block that ends in
  EOS. Its chain is not exactly pi_alpha-invariant; tests/test_mh.py measures the bias.

Unlike the published code, the prompt is computed once: every move continues the kept prefix
from its cache (a KV-cache fork, or vLLM's prefix cache) instead of re-running the prompt, and
the generator is seeded. The backend is reached through `methods.rollout.Decoder`.
"""

from __future__ import annotations

import math
import time

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import (
    check_alpha,
    check_nonnegative_int,
    check_positive_int,
    encode_prompt,
    make_generator,
)
from powersmc.methods.rollout import TemperatureRule, decoder
from powersmc.results import Cost, SampleResult

MODES = ("exact", "faithful")
FAITHFUL_TOP_K = 50


class _Chain:
    """The current state: tokens with per-token log p / log q, and a cache of all but the last."""

    def __init__(self, state, tokens, lp, lq, finished):
        self.state, self.tokens, self.lp, self.lq, self.finished = state, tokens, lp, lq, finished

    @classmethod
    def from_rollout(cls, prefix: _Chain | None, j: int, ro) -> _Chain:
        n = int(ro.lengths[0])
        head = ([], [], []) if prefix is None else (
            prefix.tokens[:j], prefix.lp[:j], prefix.lq[:j])
        return cls(ro.state, head[0] + ro.tokens[0, :n].tolist(), head[1] + ro.logp[0, :n].tolist(),
                   head[2] + ro.logq[0, :n].tolist(), bool(ro.finished[0]))


def mh_sample(
    model: LanguageModel,
    prompt: Prompt,
    *,
    alpha: float = 4.0,
    max_new_tokens: int = 3072,
    num_blocks: int = 16,
    mh_moves: int = 10,
    mode: str = "exact",
    seed: int | None = None,
) -> SampleResult:
    """Block-wise MH for pi_alpha. Defaults are the published settings: alpha = 4, 3072 tokens,
    16 blocks (B = 192), 10 moves per block."""
    alpha = check_alpha(alpha)
    check_positive_int("num_blocks", num_blocks)
    check_nonnegative_int("mh_moves", mh_moves)
    if mode not in MODES:
        raise InputError("mode", f"one of {', '.join(MODES)}", mode)
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    faithful = mode == "faithful"
    rule = TemperatureRule(1.0 / alpha, top_k=FAITHFUL_TOP_K if faithful else None)
    block = math.ceil(max_new_tokens / num_blocks)
    cost = Cost()
    start = time.perf_counter()
    # the chain and one proposal are alive at once, each at most max_new_tokens long; a
    # cache that cannot free an old chain's cells at once holds up to half a chain per move
    budget = (3 + num_blocks * mh_moves // 2) * max_new_tokens
    dec = decoder(model)
    dec.start(ids, 1, budget=budget, cost=cost)
    proposed = accepted = 0

    def regenerate(chain: _Chain | None, j: int, cap: int) -> _Chain:
        """Continue the kept prefix y_{<j} of `chain` with a new suffix of at most cap - j
        tokens (no chain: a first answer)."""
        if chain is None or j == 0:
            ro = dec.sample(1, cap - j, rule, gen, cost)
        else:
            ro = dec.sample(1, cap - j, rule, gen, cost, prefix=chain.tokens[:j],
                            source=chain.state)
        return _Chain.from_rollout(chain, j, ro)

    chain = regenerate(None, 0, min(block, max_new_tokens))  # the first block
    for k in range(1, num_blocks + 1):
        cap = min(k * block, max_new_tokens)
        if not chain.finished and len(chain.tokens) < cap:  # extend by one block (k > 1)
            n = len(chain.tokens)
            ro = dec.sample(1, cap - n, rule, gen, cost, prefix=chain.tokens,
                            source=chain.state, consume=True)
            chain = _Chain.from_rollout(chain, n, ro)
        for _ in range(mh_moves):
            L = len(chain.tokens)
            j = int(torch.randint(L, (1,), generator=gen, device=model.device))
            new = regenerate(chain, j, L if faithful else cap)
            L2 = len(new.tokens)
            if faithful:  # compare the current suffix only up to the proposal's length
                cur = slice(j, L2)
                log_r = (alpha * sum(new.lp[j:]) + sum(chain.lq[cur])
                         - alpha * sum(chain.lp[cur]) - sum(new.lq[j:]))
            else:
                log_r = (alpha * (sum(new.lp[j:]) - sum(chain.lp[j:]))
                         + sum(chain.lq[j:]) - sum(new.lq[j:]) + math.log(L) - math.log(L2))
            u = float(torch.rand((), generator=gen, device=model.device, dtype=torch.float64))
            proposed += 1
            if math.log(u) < log_r:
                chain, accepted = new, accepted + 1
        if faithful and chain.finished:
            break
    cost.seconds = time.perf_counter() - start
    return SampleResult(
        method=f"mh-{mode}", text=model.decode(chain.tokens), token_ids=chain.tokens, seed=seed,
        cost=cost, finished=chain.finished,
        stats={"mode": mode, "proposed": proposed, "accepted": accepted,
               "acceptance_rate": accepted / proposed if proposed else float("nan"),
               "block_size": block, "num_blocks": num_blocks, "mh_moves": mh_moves,
               "log_p": sum(chain.lp)},
    )
