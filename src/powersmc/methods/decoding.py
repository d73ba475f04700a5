"""Baselines of Sec. 7: plain decoding (tau = 1), low-temperature decoding (tau = 1/alpha, really
sampled), and greedy decoding; `num_samples` independent answers in one batch."""

from __future__ import annotations

import math

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import check_positive_int, encode_prompt, make_generator
from powersmc.methods.rollout import TemperatureRule, sample_rows
from powersmc.results import SampleResult


def sample(
    model: LanguageModel,
    prompt: Prompt,
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    seed: int | None = None,
) -> SampleResult:
    """Token-level sampling from q_t proportional to p_t^(1/temperature) (eq. 3), full vocabulary.

    temperature=1 is the base model ('plain'); temperature=1/alpha is the paper's
    low-temperature baseline ('lowtemp'), whose joint is the product of tempered conditionals,
    not pi_alpha (Sec. 3.2); greedy=True takes the argmax ('greedy').
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise InputError("temperature", "a finite number > 0", temperature)
    n = check_positive_int("num_samples", num_samples)
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    out, cost = sample_rows(model, ids, n, max_new_tokens, TemperatureRule(float(temperature)),
                            gen, greedy=greedy)
    samples, fin = out.sequences(), out.finished.tolist()
    texts = [model.decode(s) for s in samples]
    method = "greedy" if greedy else ("plain" if temperature == 1.0 else "lowtemp")
    return SampleResult(
        method=method, text=texts[0], token_ids=samples[0], seed=seed, cost=cost,
        finished=fin[0], samples=samples, texts=texts,
        stats={"temperature": float(temperature), "finished": fin,
               "log_p": out.logp.sum(1).tolist()},
    )
