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
* static: a `kvcache.SlotCache` preallocated from the run's `budget` (prompt + budget / rows
  slots per row, at most EAGER_SLOTS / COMPILED_SLOTS of them; it doubles when full), written
  in place; resampling is an in-place row gather. Eager, attention reads the rows and slots
  in use. Compiled (`compile=`, default on CUDA: `torch.compile(mode="reduce-overhead")`,
  i.e. CUDA graphs), the step has one shape for the life of the buffers: every row, every
  slot, a mask hiding the slots not yet written. Finished particles then stay in the batch,
  masked (their outputs are dropped) instead of leaving: on a GPU a decode step of <= 64 rows
  is bound by reading the weights, so a dead row costs little, while each new row count would
  cost a new compilation and graph capture. Buffers of a compiled shape are pooled per
  (rows, slots) and reused by the next run, so one capture serves every run of that shape.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from powersmc.backends.grouped_sdpa import ATTENTION, register_attention, static_applies
from powersmc.backends.hf_text import encode_prompt, eos_ids
from powersmc.backends.kvcache import SlotCache, reorder_cache
from powersmc.errors import InputError

CACHES = ("auto", "static", "dynamic")
# architectures whose decoder layers call `past_key_values.update(k, v, layer)` and take a
# 4-D attention mask as is (tested in CI: tests/test_static_cache.py); `auto` takes the static
# cache only for these
STATIC_MODEL_TYPES = ("llama", "qwen2")
DEFAULT_SLOTS = 256  # generated slots per row when no budget is given (grown when exceeded)
# at most this many generated slots per row up front (a budget can be far larger than what
# one state holds: MH's covers all its forks); the buffers double when full. Eager growth is
# cheap; a compiled state that grows steps eagerly from then on, hence the larger cap.
EAGER_SLOTS = 512
COMPILED_SLOTS = 4096
# compiled shapes: slots rounded up to a multiple of this, so prompts of other lengths reuse a
# shape (and its CUDA graph) instead of compiling a new one; at most POOL_SHAPES kept
SLOT_BLOCK = 256
POOL_SHAPES = 8
FORK_SLOTS = 64  # free slots a fork gets at least


def _row_slots(budget: int | None, rows: int, cap: int) -> int:
    """Generated slots per row for `budget` tokens over `rows` rows (1 .. cap)."""
    per_row = DEFAULT_SLOTS if budget is None else -(-budget // rows)
    return min(max(per_row, 1), cap)


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


@dataclass(eq=False)
class StaticState:
    """A `SlotCache` whose first `rows` rows are the state's rows, each holding `length` slots.

    mask: [R, L] bool per buffer row, slot holds a real token (not padding, not yet written);
    it goes to the model as a [rows, 1, 1, slots] mask, which every architecture takes as is.
    pad: left-padding slots per buffer row (None: a single prompt, no padding). compiled: the
    buffers are a pooled fixed shape; steps run the compiled step over all R rows.
    """

    cache: SlotCache
    length: int
    prompt_len: int
    rows: int
    mask: torch.Tensor
    pad: torch.Tensor | None = None
    compiled: bool = False


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
        self.cache = self._choose_cache(cache, continuous)
        if compile is None:
            compile = self.device.type == "cuda"
        if compile is True:
            compile = {"mode": "reduce-overhead"}
        self.compile_options: dict | None = dict(compile) if compile else None
        if self.compile_options is not None and self.cache != "static":
            raise InputError("compile", "unset or False with the dynamic cache", compile)
        self._pool: dict[tuple[int, int], tuple[SlotCache, torch.Tensor, Any]] = {}
        self._holder: dict[tuple[int, int], weakref.ref] = {}
        self._compiled: Any = None
        self.compile_error: str | None = None  # why compilation was given up, if it was

    def _choose_cache(self, cache: str, continuous: bool) -> str:
        if cache not in CACHES:
            raise InputError("cache", f"one of {', '.join(CACHES)}", cache)
        if cache == "dynamic":
            return cache
        why = static_applies(self.model)
        # auto: static on CUDA, or for a continuous scheduler. On the 2-core CPU the static
        # path measured slower per SMC step of one system (126 ms against 105 ms, default
        # model, N = 16, T = 128: docs/benchmarks.md), but only it lets systems join
        if cache == "auto" and (why or self.model.config.model_type not in STATIC_MODEL_TYPES
                                or not (self.device.type == "cuda" or continuous)):
            return "dynamic"
        if why:
            raise InputError("cache", f"'dynamic' or 'auto' for {why}", cache)
        register_attention()
        self.model.set_attn_implementation(ATTENTION)
        return "static"

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
        self, prompts: Sequence[Sequence[int]], rows: int, *, budget: int | None = None
    ) -> tuple[HFState | StaticState, torch.Tensor]:
        """One forward pass over the P left-padded prompts, shared by their `rows` rows each.
        On the static path its keys and values are then copied into the preallocated slots
        (prompt + budget / (P * rows) generated slots per row)."""
        cache, logp, width, attn, pad = self._prefill_cache(prompts)
        total = len(prompts) * rows
        if pad is not None:
            pad = pad.repeat_interleave(rows, 0)
        if self.cache == "static":
            cap = EAGER_SLOTS if self.compile_options is None else COMPILED_SLOTS
            state = self._static_state(cache, width, total, rows,
                                       width + _row_slots(budget, total, cap), attn, pad)
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

    def _static_state(self, dyn: Any, width: int, total: int, rows: int, slots: int,
                      mask: torch.Tensor | None, pad: torch.Tensor | None) -> StaticState:
        """Fill a SlotCache from the prefill's DynamicCache `dyn` (P rows, `width` slots)."""
        layers = [(la.keys, la.values) for la in dyn.layers]
        compiled = self.compile_options is not None
        if compiled:
            slots = -(-slots // SLOT_BLOCK) * SLOT_BLOCK
            buf, mbuf = self._pooled(layers, total, slots)
        else:
            buf = SlotCache.allocate(layers, total, slots)
            mbuf = torch.zeros((total, slots), dtype=torch.bool, device=self.device)
        buf.load_(layers, rows)
        buf.write, buf.rows = width, total
        mbuf.zero_()
        mbuf[:, :width] = True if mask is None else mask.bool().repeat_interleave(rows, 0)
        state = StaticState(buf, width, width, total, mbuf, pad, compiled)
        if compiled:
            if pad is None:  # the compiled step always takes per-row positions
                state.pad = torch.zeros(total, dtype=torch.long, device=self.device)
            self._holder[(total, slots)] = weakref.ref(state)
        return state

    def _pooled(self, layers: list, rows: int, slots: int) -> tuple[SlotCache, torch.Tensor]:
        """The pooled buffers of shape (rows, slots), made on first use. Their previous holder,
        if still alive, moves to buffers of its own first (it then steps eagerly), so states
        stay independent while the compiled graph keeps seeing the same addresses."""
        key = (rows, slots)
        if key not in self._pool:
            if len(self._pool) >= POOL_SHAPES:  # the oldest shape goes (a state holding its
                old = next(iter(self._pool))    # buffers keeps them until it ends)
                del self._pool[old]
                self._holder.pop(old, None)
            buf = SlotCache.allocate(layers, rows, slots)
            buf.full = True
            buf.mark_static()
            mbuf = torch.zeros((rows, slots), dtype=torch.bool, device=self.device)
            torch._dynamo.mark_static_address(mbuf)
            self._pool[key] = (buf, mbuf, None)
        holder = self._holder.pop(key, lambda: None)()
        if holder is not None and holder.cache is self._pool[key][0]:
            self._detach(holder)
        return self._pool[key][:2]

    def _detach(self, state: StaticState) -> None:
        """Give a pooled state buffers of its own (same contents), stepping eagerly."""
        n = state.rows
        index = torch.arange(n, device=self.device)
        cache = state.cache.resized(index, state.cache.capacity[1], state.length)
        cache.rows, cache.write = n, state.length
        state.cache, state.compiled = cache, False
        state.mask = state.mask[:n].clone()
        state.pad = state.pad[:n].clone() if state.pad is not None else None

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
            self._detach(state)
        c, n, t = state.cache, state.rows, state.length
        if t >= c.capacity[1]:  # past the budget: more slots (and eager from now on)
            if state.compiled:
                self._detach(state)
            self._grow(state, state.rows, 2 * c.capacity[1])
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
            self._detach(state)
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

    def _grow(self, state: StaticState, rows: int, slots: int,
              index: torch.Tensor | None = None) -> None:
        """New (eager) buffers with `rows` rows (row k := old row index[k]) and `slots` slots."""
        c = state.cache
        if index is None:
            index = torch.arange(rows, device=self.device)
        state.cache = c.resized(index, slots, state.length)
        state.cache.rows, state.cache.write = rows, state.length
        mask = torch.zeros((rows, slots), dtype=torch.bool, device=self.device)
        k = min(slots, state.mask.shape[1])
        mask[:, :k] = state.mask.index_select(0, index)[:, :k]
        state.mask = mask
        if state.pad is not None:
            state.pad = state.pad.index_select(0, index)
        state.rows = rows

    @torch.inference_mode()
    def reorder(self, state: HFState | StaticState, index: torch.Tensor) -> None:
        index = index.to(self.device)
        if isinstance(state, StaticState):
            n = index.numel()
            if n > state.cache.capacity[0]:  # more rows than the buffers hold
                if state.compiled:
                    self._detach(state)
                self._grow(state, n, state.cache.capacity[1], index)
                return
            state.cache.gather_(index, state.length)
            for name in ("mask", "pad"):
                t = getattr(state, name)
                if t is not None:
                    t[:n] = t[index]
            state.rows = state.cache.rows = n
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
        generate together (their slots); the buffers grow if a row outruns them.

        The new rows are written in place when the buffers have the rows and slots for them
        (they are allocated with room to spare), so an admission costs about its own rows,
        not a copy of the whole batch. The state is first repacked (`_repack`) otherwise,
        when a prompt is longer than the slots written so far, and when the slots before
        every running row's first token (left by rows that have finished) are at least as
        many as the slots in use. So a batch that never empties (a server under steady load)
        holds at most about twice its longest running row's slots, not one more per step for
        as long as it lives. The state steps eagerly afterwards (one new shape per admission
        would be a new compilation), and `fork(keep=...)` counts `keep` from the first rows'
        prompt."""
        if not isinstance(state, StaticState):
            raise InputError("state", "a static-cache state (cache='static') to admit into",
                             type(state).__name__)
        cache, logp, width, attn, pad = self._prefill_cache(prompts)
        if state.compiled:
            self._detach(state)
        old, new = state.rows, len(prompts) * rows
        gen = _row_slots(budget, new, EAGER_SLOTS)
        drop = 0  # slots before every running row's first token
        if state.pad is not None:
            drop = int(state.pad[:old].min()) if old else state.length
        rows_cap, slots_cap = state.cache.capacity
        if (width > state.length or drop >= max(state.length - drop, 1)
                or old + new > rows_cap or state.length + gen > slots_cap):
            self._repack(state, drop, width, old + new, gen)
        c, t = state.cache, state.length
        if state.pad is None:  # every running row starts at slot 0
            state.pad = torch.zeros(c.capacity[0], dtype=torch.long, device=self.device)
        start = t - width  # first slot of the new rows' (padded) prompts
        c.load_([(la.keys, la.values) for la in cache.layers], rows, row=old, slot=start)
        rows_new = slice(old, old + new)
        state.mask[rows_new] = False
        state.mask[rows_new, start:t] = True if attn is None else \
            attn.bool().repeat_interleave(rows, 0)
        state.pad[rows_new] = start + (0 if pad is None else pad.repeat_interleave(rows, 0))
        state.rows = c.rows = old + new
        return logp.repeat_interleave(rows, 0)

    def _repack(self, state: StaticState, drop: int, width: int, rows: int, gen: int) -> None:
        """New eager buffers for a state that will hold `rows` rows: the running rows' slots
        from `drop` on move left by `drop` (their positions, hence their RoPE keys, are
        unchanged: only the padding counts change), then right as far as a `width`-slot
        prompt needs; half as many rows again as needed and room for twice `gen` generated
        slots, so that the next admissions write in place. Only the slots in use are written
        (the others are written before any row reads them: a step's token, an admission)."""
        c, old, t = state.cache, state.rows, state.length
        kept = t - drop
        shift = max(0, width - kept)
        length = kept + shift
        cap = rows + rows // 2
        slots = max(c.capacity[1] - drop + shift, length + 2 * gen)
        buf = SlotCache.allocate(list(zip(c.keys, c.values, strict=True)), cap, slots,
                                 zeroed=False)
        for dst, src in zip((*buf.keys, *buf.values), (*c.keys, *c.values), strict=True):
            dst[:old, :, :shift] = 0
            dst[:old, :, shift:length] = src[:old, :, drop:t]
        mask = torch.zeros((cap, slots), dtype=torch.bool, device=self.device)
        mask[:old, shift:length] = state.mask[:old, drop:t]
        pad = torch.zeros(cap, dtype=torch.long, device=self.device)
        if state.pad is not None:
            pad[:old] = state.pad[:old] - drop
        pad[:old] += shift
        buf.rows, buf.write = old, length
        state.cache, state.mask, state.pad = buf, mask, pad
        state.length = length
        state.prompt_len = max(0, state.prompt_len + shift - drop)

    @property
    def joins_running(self) -> bool:
        """Systems join a running batch on the static path only (`extend`); on the dynamic
        cache they join between batches."""
        return self.cache == "static"

    max_rows = None  # the caches grow with the batch

    def free_cells(self, state: HFState | StaticState) -> int | None:
        return None

    def cells_in_use(self, state: HFState | StaticState) -> int | None:
        return None

    @torch.inference_mode()
    def fork(self, state: HFState | StaticState, keep: int | None = None) -> HFState | StaticState:
        length = state.length if keep is None else state.prompt_len + keep
        if isinstance(state, StaticState):
            # own buffers holding the rows and slots in use, with room for as many tokens
            # again (at least FORK_SLOTS); they double if the fork outgrows them. Not the
            # parent's capacity: MH's budget covers all its forks, and every fork would
            # otherwise copy all of it.
            n, cap = state.rows, state.cache.capacity[1]
            slots = min(cap, length + max(length, FORK_SLOTS))
            cache = state.cache.resized(torch.arange(n, device=self.device), slots, length)
            cache.rows, cache.write = n, length
            mask = torch.zeros((n, slots), dtype=torch.bool, device=self.device)
            mask[:, :length] = state.mask[:n, :length]
            pad = None if state.pad is None else state.pad[:n].clone()
            return StaticState(cache, length, state.prompt_len, n, mask, pad)
        cache = copy.deepcopy(state.cache)
        if length < state.length:
            cache.crop(length - state.length)
        hf_mask = None if state.mask is None else state.mask[:, :length].clone()
        return HFState(cache, length, state.prompt_len, state.rows, hf_mask, state.pad)
