"""Argument checks, seeding and small helpers shared by every sampler."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError("alpha", "a finite number >= 1", alpha)
    if alpha < 1:
        raise InputError("alpha", "a finite number >= 1 (the power target needs alpha >= 1)", alpha)
    return float(alpha)


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(name, "an integer >= 1", value)
    return value


def check_nonnegative_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(name, "an integer >= 0", value)
    return value


def check_ess_threshold(kappa: float) -> float:
    """kappa of Algorithm 1: resample when ESS < kappa N. 0 never resamples (sequential
    importance sampling: the N draws keep their whole-sequence weights, as best-of-N)."""
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0 <= kappa <= 1:
        raise InputError("ess_threshold", "a number in [0, 1]", kappa)
    return float(kappa)


def make_generator(seed: int | None, device: torch.device) -> tuple[torch.Generator, int]:
    """A fresh generator owned by one run. seed=None draws a seed from the OS (recorded in the
    result so the run can be replayed); the global torch RNG is never touched."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError("seed", "a non-negative integer or None", seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen, seed


def encode_prompt(lm: LanguageModel, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """Prompt ids, checked: non-empty, and prompt plus generation within the model's context."""
    check_positive_int("max_new_tokens", max_new_tokens)
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise InputError("prompt", "a non-empty prompt", prompt)
    ids = lm.encode_prompt(prompt)
    if not ids:
        raise InputError("prompt", "a non-empty prompt (it encodes to no tokens)", prompt)
    ctx = lm.max_context
    if ctx is not None and len(ids) >= ctx:
        raise InputError(
            "prompt", f"at most {ctx - 1} tokens for this model's context of {ctx}", len(ids)
        )
    if ctx is not None and len(ids) + max_new_tokens > ctx:
        raise InputError(
            "max_new_tokens",
            f"at most {ctx - len(ids)} for this prompt ({len(ids)} tokens) "
            f"in this model's context of {ctx}",
            max_new_tokens,
        )
    return ids


def check_logprobs_backend(lm: object, argument: str, use: str) -> None:
    """Refuse a backend that offers no next-token log-probabilities (vLLM samples tokens
    itself) where `use` needs them; the error names `argument`."""
    if not isinstance(lm, LanguageModel):
        raise InputError(argument, f"a backend with next-token log-probabilities (transformers, "
                         f"llama.cpp) for {use}; {type(lm).__name__} offers none")


def eos_tensor(lm: LanguageModel) -> torch.Tensor:
    return torch.tensor(lm.eos_token_ids, dtype=torch.long, device=lm.device)


def trim(ids: Sequence[int], eos: Sequence[int]) -> tuple[list[int], bool]:
    """Cut a token list after its first EOS; return (ids, finished)."""
    out: list[int] = []
    for i in ids:
        out.append(int(i))
        if int(i) in eos:
            return out, True
    return out, False
