"""Baselines of Sec. 7: plain decoding (tau = 1), low-temperature decoding (tau = 1/alpha, really
sampled), and greedy decoding; `num_samples` independent answers in one batch."""

from __future__ import annotations

import math
import time

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import check_positive_int, encode_prompt, make_generator
from powersmc.methods.rollout import rollout, temperature_rule
from powersmc.results import Cost, SampleResult


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
    cost = Cost()
    start = time.perf_counter()
    state, logp = model.prefill(ids, n, budget=n * max_new_tokens)
    cost.add_prefill(len(ids))
    out = rollout(model, state, logp, max_new_tokens, temperature_rule(float(temperature)), gen,
                  cost, greedy=greedy)
    cost.seconds = time.perf_counter() - start
    lens, rows, fin = out.lengths.tolist(), out.tokens.tolist(), out.finished.tolist()
    samples = [rows[i][: lens[i]] for i in range(n)]
    texts = [model.decode(s) for s in samples]
    method = "greedy" if greedy else ("plain" if temperature == 1.0 else "lowtemp")
    return SampleResult(
        method=method, text=texts[0], token_ids=samples[0], seed=seed, cost=cost,
        finished=fin[0], samples=samples, texts=texts,
        stats={"temperature": float(temperature), "finished": fin,
               "log_p": out.logp.sum(1).tolist()},
    )
