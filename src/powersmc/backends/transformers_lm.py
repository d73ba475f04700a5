"""Transformers backend: any causal LM that `transformers` loads (hub id, local dir, GGUF file).

One prefill of the prompt(s), expanded to all rows (App. C: the prompt is shared);
one cached forward per decode step over the rows still alive; resampling reindexes the cache
through `kvcache.reorder_cache`. All rows always hold the same number of tokens (finished
particles leave the batch instead of being padded). With one prompt no attention mask is
needed and positions are one scalar per step; with several prompts (`prefill_many`) the
prompts are left-padded, and a [rows, length] mask and per-row pad counts (positions are
counted from each row's first real token) travel with the cache and are reordered with it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from powersmc.backends.hf_text import encode_prompt, eos_ids
from powersmc.backends.kvcache import reorder_cache
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
    """`LanguageModel` over a `transformers` causal LM and its tokenizer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        chat: bool | None = None,
        system_prompt: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
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

    def _default_eos(self) -> tuple[int, ...]:
        gen = getattr(self.model, "generation_config", None)
        return eos_ids((getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id),
                       self.tokenizer, self.vocab_size)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat, self.system_prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = [int(i) for i in token_ids if int(i) not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

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
        with record_function("powersmc.normalize"):
            return torch.log_softmax(out.logits[:, -1, : self.vocab_size].float(), dim=-1)

    def prefill(self, prompt_ids: Sequence[int], rows: int, *,
                budget: int | None = None) -> tuple[HFState, torch.Tensor]:
        return self.prefill_many([prompt_ids], rows)

    @torch.inference_mode()
    def prefill_many(
        self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int | None = None
    ) -> tuple[HFState, torch.Tensor]:
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
        if rows != 1:
            cache.batch_repeat_interleave(rows)
        if attn is not None and pad is not None:
            attn, pad = attn.repeat_interleave(rows, 0), pad.repeat_interleave(rows, 0)
        state = HFState(cache, width, width, len(prompts) * rows, attn, pad)
        return state, logp.repeat_interleave(rows, 0)

    @torch.inference_mode()
    def step(self, state: HFState, tokens: torch.Tensor) -> torch.Tensor:
        if state.mask is not None:
            state.mask = torch.cat([state.mask, state.mask.new_ones(state.rows, 1)], 1)
        logp = self._forward(tokens.view(-1, 1).to(self.device), state.cache, state.length,
                             state.mask, state.pad)
        state.length += 1
        return logp

    @torch.inference_mode()
    def reorder(self, state: HFState, index: torch.Tensor) -> None:
        index = index.to(self.device)
        state.cache = reorder_cache(self.model, state.cache, index)
        state.rows = index.numel()
        if state.mask is not None and state.pad is not None:
            state.mask, state.pad = state.mask[index], state.pad[index]

    @torch.inference_mode()
    def fork(self, state: HFState, keep: int | None = None) -> HFState:
        cache = copy.deepcopy(state.cache)
        length = state.length if keep is None else state.prompt_len + keep
        if length < state.length:
            cache.crop(length - state.length)
        mask = None if state.mask is None else state.mask[:, :length].clone()
        return HFState(cache, length, state.prompt_len, state.rows, mask, state.pad)
