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
  EOS. Its chain is not exactly pi_alpha-invariant; tests/test_baselines.py measures the bias.

Entropy-cut MH (Zhou, Mehrotra & Liu, arXiv 2605.30327; method ``ecmh``) is the same chain
with `cut_power` = beta set: the edit index is drawn from q_cut(j | y) proportional to
max(0, H_j - H_{j-1})^beta (`mcmc.cut_law`, H the model's next-token entropy along y) instead of
uniformly, and the acceptance gains log q_cut(j | y') - log q_cut(j | y) (which replaces the
uniform law's L/L'). In the exact mode the kernel is pi_alpha-invariant with EOS; the faithful
mode keeps the published code's variable-length scoring, biased as above.

Unlike the published code, the prompt is never re-run from scratch for the whole chain: the
method is a program of the one `Scheduler` (`methods.program`), and every proposal is a
`Continue` request of the kept prefix whose rows join the running batch, so K chains (and
anything else in flight) share every forward pass; the generator is seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import (
    check_alpha,
    check_logprobs_backend,
    check_nonnegative_int,
    check_positive_int,
    encode_prompt,
    make_generator,
)
from powersmc.methods.mcmc import accept, cut_law, draw_index
from powersmc.methods.program import Continue, Program, Rows, spawn
from powersmc.results import SampleResult

MODES = ("exact", "faithful")
FAITHFUL_TOP_K = 50


@dataclass
class _Chain:
    """The current state: generated tokens with per-token log p, log q and (for the entropy
    cut) the model's next-token entropy."""

    tokens: list[int]
    lp: list[float]
    lq: list[float]
    ent: list[float]
    finished: bool

    def then(self, j: int, rows: Rows) -> _Chain:
        """y_{<j} of this chain followed by the one row of `rows`."""
        ent = self.ent[:j] + rows.entropy[0] if rows.entropy else []
        return _Chain(self.tokens[:j] + rows.tokens[0], self.lp[:j] + rows.logp[0],
                      self.lq[:j] + rows.logq[0], ent, rows.finished[0])


def check_cut_power(beta: float | None) -> float | None:
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
            math.isfinite(beta) and beta >= 0):
        raise InputError("cut_power", "a finite number >= 0 (the entropy cut's exponent beta)",
                         beta)
    return float(beta)


def mh_program(
    model: LanguageModel,
    prompt: Prompt,
    *,
    alpha: float = 4.0,
    max_new_tokens: int = 3072,
    num_blocks: int = 16,
    mh_moves: int = 10,
    mode: str = "exact",
    cut_power: float | None = None,
    seed: int | None = None,
) -> Program:
    """Block-wise MH for pi_alpha, as a program. Defaults are the published settings:
    alpha = 4, 3072 tokens, 16 blocks (B = 192), 10 moves per block. cut_power = beta: the
    entropy cut law (arXiv 2605.30327; their beta = 4); None: the uniform cut."""
    alpha = check_alpha(alpha)
    check_positive_int("num_blocks", num_blocks)
    check_nonnegative_int("mh_moves", mh_moves)
    beta = check_cut_power(cut_power)
    if mode not in MODES:
        raise InputError("mode", f"one of {', '.join(MODES)}", mode)
    if beta is not None:
        check_logprobs_backend(model, "method", "the entropy cut")
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    faithful = mode == "faithful"
    block = math.ceil(max_new_tokens / num_blocks)
    proposed = accepted = 0
    per_block: list[float | None] = []  # acceptance rate of each block's moves

    def propose(prefix: list[int], tokens: int) -> Continue:
        """A suffix of at most `tokens` tokens after the kept prefix, at temperature 1/alpha
        (inside the top 50 in the faithful mode)."""
        return Continue(ids + prefix, 1, tokens, spawn(gen), tau=1.0 / alpha,
                        top_k=FAITHFUL_TOP_K if faithful else None, entropy=beta is not None)

    def log_cut(chain: _Chain, j: int) -> float:
        """log q_cut(j | chain): uniform over its length, or the entropy cut law."""
        L = len(chain.tokens)
        if beta is None:
            return -math.log(L)
        p = cut_law(chain.ent, L, beta)[j]
        return math.log(p) if p > 0 else -math.inf

    empty = _Chain([], [], [], [], False)
    (rows,) = yield [propose([], min(block, max_new_tokens))]  # the first block
    chain = empty.then(0, rows)
    for k in range(1, num_blocks + 1):
        cap = min(k * block, max_new_tokens)
        if not chain.finished and len(chain.tokens) < cap:  # extend by one block (k > 1)
            n = len(chain.tokens)
            (rows,) = yield [propose(chain.tokens, cap - n)]
            chain = chain.then(n, rows)
        before = accepted
        for _ in range(mh_moves):
            L = len(chain.tokens)
            if beta is None:
                j = int(torch.randint(L, (1,), generator=gen, device=model.device))
            else:
                j = draw_index(cut_law(chain.ent, L, beta), gen)
            (rows,) = yield [propose(chain.tokens[:j], (L if faithful else cap) - j)]
            new = chain.then(j, rows)
            L2 = len(new.tokens)
            if faithful:  # compare the current suffix only up to the proposal's length
                cur = slice(j, L2)
                log_r = (alpha * sum(new.lp[j:]) + sum(chain.lq[cur])
                         - alpha * sum(chain.lp[cur]) - sum(new.lq[j:]))
            else:
                log_r = (alpha * (sum(new.lp[j:]) - sum(chain.lp[j:]))
                         + sum(chain.lq[j:]) - sum(new.lq[j:]))
            if beta is not None or not faithful:  # the cut law's correction
                log_r += log_cut(new, j) - log_cut(chain, j)
            proposed += 1
            if accept(log_r, gen):
                chain, accepted = new, accepted + 1
        per_block.append((accepted - before) / mh_moves if mh_moves else None)
        if faithful and chain.finished:
            break
    name = "ecmh" if beta is not None else "mh"
    return SampleResult(
        method=f"{name}-{mode}", text=model.decode(chain.tokens), token_ids=chain.tokens,
        seed=seed,
        finished=chain.finished,
        stats={"mode": mode, "proposed": proposed, "accepted": accepted,
               "acceptance_rate": accepted / proposed if proposed else float("nan"),
               "block_size": block, "num_blocks": num_blocks, "mh_moves": mh_moves,
               "cut_power": beta, "block_acceptance": per_block, "log_p": sum(chain.lp)},
    )
