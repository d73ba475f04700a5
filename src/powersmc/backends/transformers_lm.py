"""Transformers backend: any causal LM that `transformers` loads (hub id, local dir, GGUF file).

One prefill of the prompt(s), expanded to all rows (App. C: the prompt is shared); one cached
forward per decode step over the rows; resampling reindexes the cache. All rows always hold the
same number of slots. With one prompt no attention mask is needed and positions are one scalar
per step; with several prompts (`prefill_many`) the prompts are left-padded, and a [rows, slots]
mask and per-row pad counts (positions are counted from each row's first real token) travel
with the cache and are reordered with it.

Two caches (`cache=`, docs/backends.md "Transformers: the static cache"):

* dynamic: Transformers' `DynamicCache`, grown by concatenation every step (a copy of the whole
  cache per step) and reindexed on resampling (`kvcache.reorder_cache`); finished particles
  leave the batch (App. D). Works for every architecture.
* static: a `kvcache.SlotCache` preallocated from the run's `budget`, written in place;
  resampling is an in-place row gather (when it applies, the state and its buffers:
  `transformers_static`). Eager, attention reads the rows and slots in use. Compiled
  (`compile=`, default on CUDA: `torch.compile(mode="reduce-overhead")`, i.e. CUDA graphs),
  the step has one shape for the life of the buffers: every row, every slot, a mask hiding
  the slots not yet written. Finished particles then stay in the batch, masked (their outputs
  are dropped) instead of leaving: on a GPU a decode step of <= 64 rows is bound by reading
  the weights, so a dead row costs little, while each new row count would cost a new
  compilation and graph capture. Buffers of a compiled shape are pooled and reused by the
  next run of that shape, so one capture serves every run of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from powersmc.backends.hf_text import encode_prompt, eos_ids
from powersmc.backends.kvcache import SlotCache, reorder_cache
from powersmc.backends.transformers_static import (
    SlotPool,
    StaticState,
    admit,
    choose_cache,
    detach,
    gather,
    grow,
    new_state,
)
from powersmc.errors import InputError


@dataclass
class HFState:
    """A KV cache for `rows` rows that each hold `length` slots (padding and prompt included).

    mask / pad: None for a single prompt; else the attention mask [rows, length] and the number
    of left-padding slots of each row [rows].
    """

    cache: Any
    length: int
    prompt_len: int
    rows: int
    mask: torch.Tensor | None = None
    pad: torch.Tensor | None = None


class TransformersLM:
    """`LanguageModel` over a `transformers` causal LM and its tokenizer.

    cache: 'auto' (static for the Llama and Qwen2 families with SDPA attention on CUDA, else
        dynamic), 'static' or 'dynamic' (see the module docstring).
    continuous: the model serves a continuous-batching scheduler (`powersmc serve`): 'auto'
        then takes the static cache for those families on CPU too, since systems join a
        running batch only on it (on the dynamic cache they wait for the batch to empty).
    compile: compile the static decode step (None: on CUDA only; True: mode
        'reduce-overhead', i.e. CUDA graphs on a GPU; a dict: `torch.compile`'s keywords).
        On CPU the step's time is in matrix products that are already library calls, and a
        compilation takes tens of seconds per shape, so the default leaves it off there.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        chat: bool | None = None,
        system_prompt: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        cache: str = "auto",
        compile: bool | dict | None = None,
        continuous: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise InputError("chat", "False for a tokenizer without a chat template", chat)
        self.system_prompt = system_prompt
        self.eos_token_ids = (
            tuple(eos_token_ids) if eos_token_ids is not None else self._default_eos()
        )
        ctx = getattr(model.config, "max_position_embeddings", None)
        self.max_context = int(ctx) if ctx else None
        self.cache = choose_cache(self.model, self.device, cache, continuous)
        if compile is None:
            compile = self.device.type == "cuda"
        if compile is True:
            compile = {"mode": "reduce-overhead"}
        self.compile_options: dict | None = dict(compile) if compile else None
        if self.compile_options is not None and self.cache != "static":
            raise InputError("compile", "unset or False with the dynamic cache", compile)
        self._pool = SlotPool(self.device)
        self._compiled: Any = None
        self.compile_error: str | None = None  # why compilation was given up, if it was

    def _default_eos(self) -> tuple[int, ...]:
        gen = getattr(self.model, "generation_config", None)
        return eos_ids((getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id),
                       self.tokenizer, self.vocab_size)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat, self.system_prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = [int(i) for i in token_ids if int(i) not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _normalize(self, logits: torch.Tensor) -> torch.Tensor:
        with record_function("powersmc.normalize"):
            return torch.log_softmax(logits[:, -1, : self.vocab_size].float(), dim=-1)

    def _forward(self, ids: torch.Tensor, cache: Any, start: int,
                 mask: torch.Tensor | None = None,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        if pad is not None:
            pos = (pos - pad[:, None]).clamp(min=0)
        out = self.model(
            input_ids=ids, past_key_values=cache, position_ids=pos, attention_mask=mask,
            use_cache=True, logits_to_keep=1,
        )
        return self._normalize(out.logits)

    def prefill(self, prompt_ids: Sequence[int], rows: int, *,
                budget: int | None = None) -> tuple[HFState | StaticState, torch.Tensor]:
        return self.prefill_many([prompt_ids], rows, budget=budget)

    @torch.inference_mode()
    def prefill_many(
        self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int | None = None,
        room: tuple[int, int] | None = None,
    ) -> tuple[HFState | StaticState, torch.Tensor]:
        """One forward pass over the P left-padded prompts, shared by their `rows` rows each.
        On the static path its keys and values are then copied into the preallocated slots
        (prompt + budget / (P * rows) generated slots per row)."""
        cache, logp, width, attn, pad = self._prefill_cache(prompts)
        total = len(prompts) * rows
        if pad is not None:
            pad = pad.repeat_interleave(rows, 0)
        if self.cache == "static":
            state = new_state([(la.keys, la.values) for la in cache.layers], width, total, rows,
                              budget, attn, pad, device=self.device,
                              pool=None if self.compile_options is None else self._pool)
            return state, logp.repeat_interleave(rows, 0)
        if rows != 1:
            cache.batch_repeat_interleave(rows)
        if attn is not None:
            attn = attn.repeat_interleave(rows, 0)
        return HFState(cache, width, width, total, attn, pad), logp.repeat_interleave(rows, 0)

    def _prefill_cache(self, prompts: Sequence[Sequence[int]]) -> tuple[
            Any, torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        """One forward pass over the P prompts, left-padded to the longest (`width`): its
        `DynamicCache`, the next-token log-probs [P, V], `width`, and the [P, width] mask and
        per-prompt padding (both None when no prompt is padded)."""
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.eos_token_ids[0] if pad_id is None else pad_id
        ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids = ids.to(self.device)
        attn: torch.Tensor | None = None  # no padding: no mask, one position per step
        pad: torch.Tensor | None = None
        if not bool(mask.all()):
            attn = mask.to(self.device)
            pad = width - attn.sum(1)
        cache = DynamicCache(config=self.model.config)
        logp = self._forward(ids, cache, 0, attn, pad)
        return cache, logp, width, attn, pad

    @torch.inference_mode()
    def step(self, state: HFState | StaticState, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(state, StaticState):
            return self._static_step(state, tokens.to(self.device))
        if state.mask is not None:
            state.mask = torch.cat([state.mask, state.mask.new_ones(state.rows, 1)], 1)
        logp = self._forward(tokens.view(-1, 1).to(self.device), state.cache, state.length,
                             state.mask, state.pad)
        state.length += 1
        return logp

    def _static_step(self, state: StaticState, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row into slot `length`: eager over the rows and slots in use, or the
        compiled fixed-shape step over all buffer rows (rows past `rows` are dead: their
        outputs are dropped)."""
        if state.compiled and self.compile_options is None:  # compilation was given up
            detach(state)
        c, n, t = state.cache, state.rows, state.length
        if t >= c.capacity[1]:  # past the budget: more slots (and eager from now on)
            if state.compiled:
                detach(state)
            grow(state, state.rows, 2 * c.capacity[1])
            c = state.cache
        if state.compiled:
            return self._compiled_step(state, tokens)
        c.rows, c.write = n, t
        state.mask[:n, t] = True
        pos = torch.full((n, 1), t, dtype=torch.long, device=self.device)
        if state.pad is not None:
            pos = pos - state.pad[:n, None]
        out = self.model(input_ids=tokens.view(-1, 1), past_key_values=c, position_ids=pos,
                         attention_mask=state.mask[:n, None, None, : t + 1], use_cache=True,
                         logits_to_keep=1)
        state.length += 1
        c.write = state.length
        return self._normalize(out.logits)

    def _compiled_step(self, state: StaticState, tokens: torch.Tensor) -> torch.Tensor:
        c, n, t = state.cache, state.rows, state.length
        rows = c.capacity[0]
        ids = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        ids[:n, 0] = tokens
        c.pos.fill_(t)
        state.mask[:, t] = True
        pos = (t - state.pad).view(-1, 1) if state.pad is not None else torch.full(
            (rows, 1), t, dtype=torch.long, device=self.device)
        if self._compiled is None:
            self._compiled = torch.compile(self._decode, **(self.compile_options or {}))
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        try:
            logits = self._compiled(ids, pos, state.mask, c)
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not lose the run
            if self.compile_error is not None:
                raise
            # nothing was written yet (the step failed before or inside the graph, which
            # only writes slot t, rewritten below): go on eagerly, and say why
            self.compile_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"compiled decode step failed, static cache runs eagerly: "
                          f"{self.compile_error}", RuntimeWarning, stacklevel=3)
            self.compile_options = None
            detach(state)
            return self._static_step(state, tokens)
        state.length += 1
        c.write = state.length
        return self._normalize(logits[:n])

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                cache: SlotCache) -> torch.Tensor:
        """The fixed-shape decode step that torch.compile captures: every buffer row, every
        slot, the slots not written yet masked out."""
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=pos,
                         attention_mask=mask[:, None, None, :], use_cache=True,
                         logits_to_keep=1)
        return out.logits

    @torch.inference_mode()
    def reorder(self, state: HFState | StaticState, index: torch.Tensor) -> None:
        index = index.to(self.device)
        if isinstance(state, StaticState):
            gather(state, index)
            return
        state.cache = reorder_cache(self.model, state.cache, index)
        state.rows = index.numel()
        if state.mask is not None and state.pad is not None:
            state.mask, state.pad = state.mask[index], state.pad[index]

    @torch.inference_mode()
    def extend(self, state: StaticState, prompts: Sequence[Sequence[int]], rows: int, *,
               budget: int | None = None) -> torch.Tensor:
        """Add `rows` rows for each of `prompts` to a running static-cache state, after its
        rows (prompt-major), and return their next-token log-probs [len(prompts) * rows, V].

        The new prompts are prefilled in one pass (shared by their rows, as `prefill_many`)
        and their keys and values placed right-aligned, the last prompt token in the state's
        last written slot, with left padding before it. Positions count from each row's first
        real token and the mask hides the padding, so every row still attends exactly to its
        own sequence: the running rows' next-token log-probs are unchanged, and the new rows'
        equal a fresh `prefill_many` of their prompts. `budget`: the tokens the new rows will
        generate together (their slots); the buffers grow if a row outruns them. When the
        new rows are written in place, and when the state is repacked first:
        `transformers_static.admit`."""
        if not isinstance(state, StaticState):
            raise InputError("state", "a static-cache state (cache='static') to admit into",
                             type(state).__name__)
        cache, logp, width, attn, pad = self._prefill_cache(prompts)
        admit(state, [(la.keys, la.values) for la in cache.layers], rows, width, attn, pad,
              budget)
        return logp.repeat_interleave(rows, 0)

    @property
    def joins_running(self) -> bool:
        """Systems join a running batch on the static path only (`extend`); on the dynamic
        cache they join between batches."""
        return self.cache == "static"

    max_rows = None  # the caches grow with the batch

    def fits(self, state: HFState | StaticState, rows: int, length: int) -> bool:
        return True  # the caches grow with the batch

    def cells_in_use(self, state: HFState | StaticState) -> int | None:
        return None
