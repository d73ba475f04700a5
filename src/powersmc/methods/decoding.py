"""Baselines of Sec. 7: plain decoding (tau = 1), low-temperature decoding (tau = 1/alpha, really
sampled) and greedy decoding, plus OpenAI's top-k / top-p; `num_samples` independent answers
as the rows of one `Continue` request of the one `Scheduler`."""

from __future__ import annotations

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.methods.common import check_positive_int, encode_prompt, make_generator
from powersmc.methods.program import Continue, Program, check_tau
from powersmc.proposals import check_nucleus
from powersmc.results import SampleResult


def decode_program(
    model: LanguageModel,
    prompt: Prompt,
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    seed: int | None = None,
) -> Program:
    """Token-level sampling from q_t proportional to p_t^(1/temperature) (eq. 3), full
    vocabulary unless top_k / top_p restrict it (temperature first, then top-k, then top-p,
    the order of Transformers and OpenAI-compatible servers).

    temperature=1 is the base model ('plain'); temperature=1/alpha is the paper's
    low-temperature baseline ('lowtemp'), whose joint is the product of tempered conditionals,
    not pi_alpha (Sec. 3.2); greedy=True takes the argmax ('greedy').
    """
    if not greedy:
        check_tau(temperature)
    check_nucleus(top_k, top_p)
    n = check_positive_int("num_samples", num_samples)
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    tau = 1.0 if greedy else float(temperature)
    (out,) = yield [Continue(ids, n, max_new_tokens, gen, tau=tau, top_k=top_k, top_p=top_p,
                             greedy=greedy)]
    texts = [model.decode(s) for s in out.tokens]
    method = "greedy" if greedy else ("plain" if tau == 1.0 else "lowtemp")
    return SampleResult(
        method=method, text=texts[0], token_ids=out.tokens[0], seed=seed,
        finished=out.finished[0], samples=out.tokens, texts=texts,
        stats={"temperature": 0.0 if greedy else tau, "top_k": top_k, "top_p": top_p,
               "finished": out.finished, "log_p": out.log_p()},
    )
