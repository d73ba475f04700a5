"""Baselines of Sec. 7: plain decoding (tau = 1), low-temperature decoding (tau = 1/alpha, really
sampled) and greedy decoding, plus OpenAI's top-k / top-p; `num_samples` independent answers
as the rows of one `Continue` request of the one `Scheduler`; with select='majority' (method
'maj'), self-consistency: the answer most samples give (`methods.selection.majority`)."""

from __future__ import annotations

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.common import check_positive_int, encode_prompt, make_generator
from powersmc.methods.program import Continue, Program, check_tau
from powersmc.methods.selection import AnswerKey, majority
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
    select: str = "sample",
    key: AnswerKey | None = None,
) -> Program:
    """Token-level sampling from q_t proportional to p_t^(1/temperature) (eq. 3), full
    vocabulary unless top_k / top_p restrict it (temperature first, then top-k, then top-p,
    the order of Transformers and OpenAI-compatible servers).

    temperature=1 is the base model ('plain'); temperature=1/alpha is the paper's
    low-temperature baseline ('lowtemp'), whose joint is the product of tempered conditionals,
    not pi_alpha (Sec. 3.2); greedy=True takes the argmax ('greedy').

    select='sample': the answer is the first sample; 'majority': the answer of the largest
    pool of samples by key(text) (default: the text), ties to the highest summed log p
    (stats['votes']: the pools' sizes; stats['voted_particle'] is None if no sample has an
    answer, and the first is kept).
    """
    if not greedy:
        check_tau(temperature)
    check_nucleus(top_k, top_p)
    n = check_positive_int("num_samples", num_samples)
    if select not in ("sample", "majority"):
        raise InputError("select", "'sample' or 'majority' for decoding (its samples carry no "
                         "weights)", select)
    if select == "majority" and n < 2:
        raise InputError("select", "'sample' for one answer (a majority needs num_samples "
                         ">= 2)", select)
    ids = encode_prompt(model, prompt, max_new_tokens)
    gen, seed = make_generator(seed, model.device)
    tau = 1.0 if greedy else float(temperature)
    (out,) = yield [Continue(ids, n, max_new_tokens, gen, tau=tau, top_k=top_k, top_p=top_p,
                             greedy=greedy)]
    texts = [model.decode(s) for s in out.tokens]
    log_p = out.log_p()
    stats = {"temperature": 0.0 if greedy else tau, "top_k": top_k, "top_p": top_p,
             "finished": out.finished, "log_p": log_p, "select": select}
    pick = 0
    if select == "majority":
        v = majority(texts, log_p, key)
        stats["voted_particle"] = v
        keyed = [(key or (lambda t: t))(t) for t in texts]
        stats["votes"] = sorted((keyed.count(k) for k in set(keyed) if k is not None),
                                reverse=True)
        pick = 0 if v is None else v
    method = "greedy" if greedy else ("plain" if tau == 1.0 else "lowtemp")
    return SampleResult(
        method="maj" if select == "majority" else method, text=texts[pick],
        token_ids=out.tokens[pick], seed=seed, finished=out.finished[pick], samples=out.tokens,
        texts=texts, stats=stats)
