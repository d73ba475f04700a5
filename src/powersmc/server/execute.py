"""Running jobs on the model: prompt encoding, one `smc_sample_many` per SMC batch, the other
methods one job at a time, and the answers cut back into per-job choices.

Only the worker thread calls into this module, so the model and tokenizer are never used from
two threads at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.methods.common import encode_prompt
from powersmc.methods.registry import run_method, smc_options
from powersmc.methods.smc import smc_sample_many
from powersmc.results import SampleResult, SMCResult
from powersmc.server.errors import APIError, from_input_error
from powersmc.server.jobs import Job
from powersmc.server.plain import plain_sample
from powersmc.server.schemas import MAX_SEED
from powersmc.server.systems import DECODING


@dataclass
class Choice:
    """One drawn answer, after `stop` was applied."""

    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class JobResult:
    """Everything a response needs: choices (prompt-major, n per prompt), prompt token
    count, and the `powersmc` object (method, options, cost, diagnostics)."""

    choices: list[Choice]
    prompt_tokens: int
    info: dict[str, Any] = field(default_factory=dict)


def chat_prompt_ids(lm: LanguageModel, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a conversation, rendered by the backend's chat template.

    A backend may define `encode_chat(messages)`; otherwise the tokenizer's template is used
    (Transformers). Without either, chat is refused rather than guessed.
    """
    encode_chat = getattr(lm, "encode_chat", None)
    if callable(encode_chat):
        return list(encode_chat(messages))
    tok = getattr(lm, "tokenizer", None)
    if tok is not None and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(messages, add_generation_prompt=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    raise APIError(400, "messages: this model has no chat template; use /v1/completions",
                   param="messages", code="no_chat_template")


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut `text` before the first occurrence of any stop string (OpenAI semantics)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Executor:
    """Runs lists of jobs (one batch) on `lm`."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm

    def encode(self, job: Job) -> list[list[int]]:
        """Prompt ids of each prompt of `job`, checked against the context; 400 otherwise."""
        out = []
        for prompt in job.prompts:
            try:
                ids = chat_prompt_ids(self.lm, prompt) if job.chat else prompt
                ids = encode_prompt(self.lm, ids, job.max_tokens)
            except InputError as exc:
                err = from_input_error(exc)
                if job.chat and err.param == "prompt":
                    err.param, err.message = "messages", "messages" + err.message[6:]
                raise err from None
            if max(ids) >= self.lm.vocab_size:
                raise APIError(400, f"prompt: token ids must be < {self.lm.vocab_size}",
                               param="prompt", code="invalid_value")
            out.append(ids)
        return out

    def run(self, jobs: list[Job]) -> list[JobResult | APIError]:
        """One outcome per job. A job whose prompts fail to encode gets its own 400 and the
        rest still run; an exception while sampling propagates (the worker fails the batch)."""
        outcomes: list[JobResult | APIError | None] = [None] * len(jobs)
        encoded: dict[int, list[list[int]]] = {}
        for i, job in enumerate(jobs):
            try:
                encoded[i] = self.encode(job)
            except APIError as exc:
                outcomes[i] = exc
        live = list(encoded)
        if live and jobs[live[0]].method == "smc":
            for i, res in zip(live, self._smc([jobs[i] for i in live],
                                              [encoded[i] for i in live]), strict=True):
                outcomes[i] = res
        else:
            for i in live:  # only SMC jobs are ever batched together
                outcomes[i] = self._single(jobs[i], encoded[i])
        return outcomes  # type: ignore[return-value]

    def _smc(self, jobs: list[Job], ids: list[list[list[int]]]) -> list[JobResult]:
        """All jobs' particle systems in one `smc_sample_many` batch (equal batch keys; the
        windowed batcher's path)."""
        head = jobs[0]
        flat = [p for job, prompts in zip(jobs, ids, strict=True) for p in prompts
                for _ in range(job.n)]
        seed = head.seed if len(jobs) == 1 else None
        results = smc_sample_many(self.lm, flat, alpha=head.alpha,
                                  max_new_tokens=head.max_tokens, seed=seed,
                                  **smc_options(head.options))
        out, k = [], 0
        for job, prompts in zip(jobs, ids, strict=True):
            out.append(self.smc_result(job, prompts, results[k: k + job.systems], len(jobs),
                                       len(flat)))
            k += job.systems
        return out

    def smc_result(self, job: Job, ids: list[list[int]], results: list[SMCResult],
                   batch_requests: int, batch_systems: int) -> JobResult:
        """A job's answer from its scheduler systems' results (`server.systems`): one answer
        per system (Power-SMC, best-of-N) or every row of one system per prompt (decoding);
        prompt-major, n per prompt."""
        info = self._info(job, results[0], batch_requests, batch_systems,
                          sum(r.cost.token_evals for r in results))
        if job.seed is None and len(results) > 1:  # each system drew its own seed
            info["seed"] = None
        info["seconds"] = max(r.cost.seconds for r in results)
        if job.method in DECODING:
            choices = [self._choice(job, p.token_ids, p.text, p.finished)
                       for r in results for p in r.particles]
            return JobResult(choices, sum(map(len, ids)), info)
        info |= {"particles": job.options["particles"], "log_z": [r.log_z for r in results],
                 "resample_steps": [list(r.resample_steps) for r in results]}
        choices = [self._choice(job, r.token_ids, r.text, r.finished) for r in results]
        return JobResult(choices, sum(map(len, ids)), info)

    def _single(self, job: Job, ids: list[list[int]]) -> JobResult:
        """A non-SMC job: decoding methods draw n samples in one batch; MH and Scalable Power
        Sampling run n times. A seeded job's k-th sampler call uses seed + k (mod 2^63, so a
        seed near the top of the allowed range stays one)."""
        start, choices = time.perf_counter(), []
        results: list[SampleResult] = []
        for prompt in ids:
            if job.method in DECODING:
                res = self._decode(job, prompt, self._seed(job, len(results)))
                results.append(res)
                choices += [self._choice(job, s, t, f) for s, t, f in
                            zip(res.samples, res.texts, res.stats["finished"], strict=True)]
                continue
            for _ in range(job.n):
                res = run_method(job.method, self.lm, prompt, alpha=job.alpha,
                                 max_new_tokens=job.max_tokens,
                                 seed=self._seed(job, len(results)), **job.options)
                results.append(res)
                choices.append(self._choice(job, res.token_ids, res.text, res.finished))
        info = self._info(job, results[-1], 1, job.systems,
                          sum(r.cost.token_evals for r in results))
        info["seconds"] = time.perf_counter() - start
        return JobResult(choices, sum(map(len, ids)), info)

    @staticmethod
    def _seed(job: Job, k: int) -> int | None:
        return None if job.seed is None else (job.seed + k) & MAX_SEED

    def _decode(self, job: Job, prompt: list[int], seed: int | None) -> SampleResult:
        """n samples in one batch: plain (with its temperature / top_p / top_k), lowtemp or
        greedy decoding."""
        if job.method == "plain":
            return plain_sample(self.lm, prompt, num_samples=job.n, seed=seed,
                                max_new_tokens=job.max_tokens, **job.options)
        return run_method(job.method, self.lm, prompt, alpha=job.alpha,
                          max_new_tokens=job.max_tokens, seed=seed, num_samples=job.n)

    def _info(self, job: Job, res: SampleResult, batch_requests: int, batch_prompts: int,
              token_evals: int) -> dict[str, Any]:
        seed = job.seed if job.seed is not None else (
            res.seed if batch_requests == 1 and job.method == "smc" else None)
        return {"method": job.method, "alpha": job.alpha, "options": dict(job.options),
                "seed": seed, "seconds": res.cost.seconds, "token_evals": token_evals,
                "batch_requests": batch_requests, "batch_prompts": batch_prompts}

    def _choice(self, job: Job, token_ids: list[int], text: str, finished: bool) -> Choice:
        text, stopped = apply_stop(text, job.stop)
        eos = set(self.lm.eos_token_ids)
        return Choice(text=text, finish_reason="stop" if stopped or finished else "length",
                      completion_tokens=sum(1 for t in token_ids if t not in eos))
