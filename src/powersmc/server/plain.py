"""Plain sampling with OpenAI's temperature / top_k / top_p, for method 'plain' only.

`methods.decoding.sample` covers temperature alone; truncation is added here (temperature
first, then top-k, then top-p, the order Transformers and OpenAI-compatible servers use).
For the power methods these controls are refused: they would change the target.
"""

from __future__ import annotations

import time

import torch

from powersmc.backends.protocol import LanguageModel
from powersmc.methods.common import check_positive_int, make_generator
from powersmc.methods.decoding import sample
from powersmc.methods.rollout import rollout
from powersmc.proposals import sample_tempered, truncate_logprobs
from powersmc.results import Cost, SampleResult


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

    def rule(logp: torch.Tensor, gen: torch.Generator | None,
             greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logq = truncate_logprobs(torch.log_softmax(logp / temperature, -1), top_k=top_k,
                                 top_p=top_p)
        tok = sample_tempered(logq, 1.0, gen)[0]
        return (tok, logp.gather(1, tok[:, None]).squeeze(1).double(),
                logq.gather(1, tok[:, None]).squeeze(1).double())

    cost, start = Cost(), time.perf_counter()
    state, logp = model.prefill(prompt_ids, n, budget=n * max_new_tokens)
    cost.add_prefill(len(prompt_ids))
    out = rollout(model, state, logp, max_new_tokens, rule, gen, cost)
    cost.seconds = time.perf_counter() - start
    lens, rows, fin = out.lengths.tolist(), out.tokens.tolist(), out.finished.tolist()
    samples = [rows[i][: lens[i]] for i in range(n)]
    texts = [model.decode(s) for s in samples]
    return SampleResult(method="plain", text=texts[0], token_ids=samples[0], seed=seed,
                        cost=cost, finished=fin[0], samples=samples, texts=texts,
                        stats={"temperature": temperature, "top_p": top_p, "top_k": top_k,
                               "finished": fin})
