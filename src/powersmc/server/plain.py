"""Plain sampling with OpenAI's temperature / top_k / top_p, for method 'plain' only.

`methods.decoding.sample` covers temperature alone; truncation is added here (temperature
first, then top-k, then top-p, the order Transformers and OpenAI-compatible servers use).
For the power methods these controls are refused: they would change the target.
"""

from __future__ import annotations

from powersmc.backends.protocol import LanguageModel
from powersmc.methods.common import check_positive_int, make_generator
from powersmc.methods.decoding import sample
from powersmc.methods.rollout import TemperatureRule, sample_rows
from powersmc.results import SampleResult


def plain_sample(model: LanguageModel, prompt_ids: list[int], *, temperature: float,
                 top_p: float | None, top_k: int | None, num_samples: int,
                 max_new_tokens: int, seed: int | None) -> SampleResult:
    """`num_samples` independent answers from the model at `temperature` (0: greedy),
    restricted to its top-k / top-p nucleus when given."""
    if temperature == 0:
        return sample(model, prompt_ids, greedy=True, num_samples=num_samples,
                      max_new_tokens=max_new_tokens, seed=seed)
    if top_k is None and (top_p is None or top_p >= 1):
        return sample(model, prompt_ids, temperature=temperature, num_samples=num_samples,
                      max_new_tokens=max_new_tokens, seed=seed)
    n = check_positive_int("num_samples", num_samples)
    gen, seed = make_generator(seed, model.device)

    rule = TemperatureRule(temperature, top_k=top_k, top_p=top_p)
    out, cost = sample_rows(model, prompt_ids, n, max_new_tokens, rule, gen)
    samples, fin = out.sequences(), out.finished.tolist()
    texts = [model.decode(s) for s in samples]
    return SampleResult(method="plain", text=texts[0], token_ids=samples[0], seed=seed,
                        cost=cost, finished=fin[0], samples=samples, texts=texts,
                        stats={"temperature": temperature, "top_p": top_p, "top_k": top_k,
                               "finished": fin})
