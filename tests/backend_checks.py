"""Shared helpers of the real-model backend tests (Transformers and llama.cpp)."""

import torch


def grow(lm, prompt, steps, rows, seed=0):
    """Prefill `prompt` for `rows` rows and sample `steps` tokens each (seeded, full
    vocabulary). Returns (state, the rows' full id sequences, the last next-token logprobs)."""
    state, logp = lm.prefill(prompt, rows, budget=rows * (steps + 2))
    seqs = [list(prompt) for _ in range(rows)]
    logp = sample_steps(lm, state, logp, seqs, steps, torch.Generator().manual_seed(seed))
    return state, seqs, logp


def sample_steps(lm, state, logp, seqs, steps, gen):
    """Sample `steps` tokens for every row of `state` from `logp` (full vocabulary, `gen`),
    appending them to `seqs`; returns the last next-token logprobs."""
    for _ in range(steps):
        tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        for s, t in zip(seqs, tok.tolist(), strict=True):
            s.append(t)
        logp = lm.step(state, tok)
    return logp
