"""What the worker does around the scheduler: prompt encoding, and the programs' results cut
into per-job choices.

Only the worker thread calls into this module, so the model and tokenizer are never used from
two threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from powersmc.backends.protocol import LanguageModel
from powersmc.errors import InputError
from powersmc.methods.common import encode_prompt
from powersmc.methods.registry import DECODING
from powersmc.results import ImportanceResult, SampleResult, SMCResult
from powersmc.server.errors import APIError, from_input_error
from powersmc.server.jobs import Job


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
    """Encodes jobs for `lm` and assembles their answers."""

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

    def job_result(self, job: Job, ids: list[list[int]], results: list[SampleResult],
                   batch_requests: int, batch_systems: int) -> JobResult:
        """A job's answer from its programs' results (`server.systems`): every sample of one
        program per prompt (decoding) or one answer per program; prompt-major, n per
        prompt."""
        info = self._info(job, results[0], batch_requests, batch_systems,
                          sum(r.cost.token_evals for r in results))
        if job.seed is None and len(results) > 1:  # each program drew its own seed
            info["seed"] = None
        info["seconds"] = max(r.cost.seconds for r in results)
        if job.method in DECODING:
            choices = [self._choice(job, s, t, f) for r in results
                       for s, t, f in zip(r.samples, r.texts, r.stats["finished"], strict=True)]
            return JobResult(choices, sum(map(len, ids)), info)
        weighted = [r for r in results if isinstance(r, (SMCResult, ImportanceResult))]
        if weighted:  # Power-SMC, best-of-N
            info |= {"particles": weighted[0].num_particles, "log_z": [r.log_z for r in weighted]}
        smc = [r for r in results if isinstance(r, SMCResult)]
        if smc:
            info["resample_steps"] = [list(r.resample_steps) for r in smc]
        choices = [self._choice(job, r.token_ids, r.text, r.finished) for r in results]
        return JobResult(choices, sum(map(len, ids)), info)

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
