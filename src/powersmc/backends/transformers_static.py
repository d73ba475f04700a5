"""The Transformers backend's static cache (`TransformersLM(cache="static")`): which models
get it, its state, and what is done to the state's buffers between forward passes.

`choose_cache` resolves `cache=` ('auto' takes the static cache for the architectures known
to run on it, on CUDA or for a continuous-batching server) and sets the model's attention to
`grouped_sdpa`'s when the static cache is taken.

A `StaticState` holds its rows' keys and values in a `kvcache.SlotCache` preallocated from the
run's `budget` (`new_state`: prompt + budget / rows slots per row, at most EAGER_SLOTS /
COMPILED_SLOTS of them), written in place. The buffers double when full and are reallocated
when more rows come than they hold (`grow`); resampling is an in-place row gather (`gather`);
new systems join a running state (`admit`), in place while the buffers have room, else after
a repack (`repack`) that also drops the slots no running row reads any more.

Buffers of a compiled shape (`transformers_lm`: one shape for the life of the buffers, every
row, every slot) come from a `SlotPool` and are reused by the next run of that shape, so one
compilation and CUDA graph capture serve every run of it. A state whose pooled buffers are
lent to a newer state, or that has to change shape, first moves to buffers of its own
(`detach`) and steps eagerly from then on. The forward passes themselves stay in
`transformers_lm`, which alone knows the model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from powersmc.backends.grouped_sdpa import ATTENTION, register_attention, static_applies
from powersmc.backends.kvcache import SlotCache
from powersmc.errors import InputError

CACHES = ("auto", "static", "dynamic")
# architectures whose decoder layers call `past_key_values.update(k, v, layer)` and take a
# 4-D attention mask as is (tested in CI: tests/test_static_cache.py); `auto` takes the static
# cache only for these
STATIC_MODEL_TYPES = ("llama", "qwen2")
DEFAULT_SLOTS = 256  # generated slots per row when no budget is given (grown when exceeded)
# at most this many generated slots per row up front (a budget can be far larger than what
# one state holds); the buffers double when full. Eager growth is
# cheap; a compiled state that grows steps eagerly from then on, hence the larger cap.
EAGER_SLOTS = 512
COMPILED_SLOTS = 4096
# compiled shapes: slots rounded up to a multiple of this, so prompts of other lengths reuse a
# shape (and its CUDA graph) instead of compiling a new one; at most POOL_SHAPES kept
SLOT_BLOCK = 256
POOL_SHAPES = 8

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # a prefill's per-layer (keys, values)


def choose_cache(model: Any, device: torch.device, cache: str, continuous: bool) -> str:
    """'static' or 'dynamic': the cache `cache` ('auto', 'static' or 'dynamic') gives `model`
    on `device`, for a continuous-batching scheduler with `continuous`."""
    if cache not in CACHES:
        raise InputError("cache", f"one of {', '.join(CACHES)}", cache)
    if cache == "dynamic":
        return cache
    why = static_applies(model)
    # auto: static on CUDA, or for a continuous scheduler. On the 2-core CPU the static
    # path measured slower per SMC step of one system (126 ms against 105 ms, default
    # model, N = 16, T = 128: docs/benchmarks.md), but only it lets systems join
    if cache == "auto" and (why or model.config.model_type not in STATIC_MODEL_TYPES
                            or not (device.type == "cuda" or continuous)):
        return "dynamic"
    if why:
        raise InputError("cache", f"'dynamic' or 'auto' for {why}", cache)
    register_attention()
    model.set_attn_implementation(ATTENTION)
    return "static"


def row_slots(budget: int | None, rows: int, cap: int) -> int:
    """Generated slots per row for `budget` tokens over `rows` rows (1 .. cap)."""
    per_row = DEFAULT_SLOTS if budget is None else -(-budget // rows)
    return min(max(per_row, 1), cap)


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


class SlotPool:
    """The buffers of compiled shapes (rows, slots), made on first use, at most POOL_SHAPES of
    them, each lent to one state at a time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[int, int], tuple[SlotCache, torch.Tensor]] = {}
        self._holder: dict[tuple[int, int], weakref.ref] = {}

    def take(self, layers: Layers, rows: int, slots: int) -> tuple[SlotCache, torch.Tensor]:
        """The pooled buffers of shape (rows, slots) and their mask. Their previous holder, if
        still alive, moves to buffers of its own first (it then steps eagerly), so states stay
        independent while the compiled graph keeps seeing the same addresses."""
        key = (rows, slots)
        if key not in self._buffers:
            if len(self._buffers) >= POOL_SHAPES:  # the oldest shape goes (a state holding
                old = next(iter(self._buffers))    # its buffers keeps them until it ends)
                del self._buffers[old]
                self._holder.pop(old, None)
            buf = SlotCache.allocate(layers, rows, slots)
            buf.full = True
            buf.mark_static()
            mbuf = torch.zeros((rows, slots), dtype=torch.bool, device=self.device)
            torch._dynamo.mark_static_address(mbuf)
            self._buffers[key] = (buf, mbuf)
        holder = self._holder.pop(key, lambda: None)()
        if holder is not None and holder.cache is self._buffers[key][0]:
            detach(holder)
        return self._buffers[key]

    def hold(self, state: StaticState) -> None:
        """`state` now holds the pooled buffers of its shape."""
        self._holder[state.cache.capacity] = weakref.ref(state)


def new_state(layers: Layers, width: int, total: int, rows: int, budget: int | None,
              mask: torch.Tensor | None, pad: torch.Tensor | None, *, device: torch.device,
              pool: SlotPool | None) -> StaticState:
    """A state of `total` rows from a prefill of P = total / rows prompts (`layers`, P rows
    and `width` slots; `mask` [P, width] and `pad` [total] None when no prompt is padded),
    each prompt shared by `rows` rows, with room for `budget` generated tokens. Its buffers
    come from `pool` when the decode step is compiled, else are its own."""
    slots = width + row_slots(budget, total, EAGER_SLOTS if pool is None else COMPILED_SLOTS)
    if pool is not None:
        slots = -(-slots // SLOT_BLOCK) * SLOT_BLOCK
        buf, mbuf = pool.take(layers, total, slots)
    else:
        buf = SlotCache.allocate(layers, total, slots)
        mbuf = torch.zeros((total, slots), dtype=torch.bool, device=device)
    buf.load_(layers, rows)
    buf.write, buf.rows = width, total
    mbuf.zero_()
    mbuf[:, :width] = True if mask is None else mask.bool().repeat_interleave(rows, 0)
    state = StaticState(buf, width, width, total, mbuf, pad, pool is not None)
    if pool is not None:
        if pad is None:  # the compiled step always takes per-row positions
            state.pad = torch.zeros(total, dtype=torch.long, device=device)
        pool.hold(state)
    return state


def detach(state: StaticState) -> None:
    """Give a pooled state buffers of its own (same contents), stepping eagerly."""
    n = state.rows
    index = torch.arange(n, device=state.mask.device)
    cache = state.cache.resized(index, state.cache.capacity[1], state.length)
    cache.rows, cache.write = n, state.length
    state.cache, state.compiled = cache, False
    state.mask = state.mask[:n].clone()
    state.pad = state.pad[:n].clone() if state.pad is not None else None


def grow(state: StaticState, rows: int, slots: int, index: torch.Tensor | None = None) -> None:
    """New (eager) buffers with `rows` rows (row k := old row index[k]) and `slots` slots."""
    c, device = state.cache, state.mask.device
    if index is None:
        index = torch.arange(rows, device=device)
    state.cache = c.resized(index, slots, state.length)
    state.cache.rows, state.cache.write = rows, state.length
    mask = torch.zeros((rows, slots), dtype=torch.bool, device=device)
    k = min(slots, state.mask.shape[1])
    mask[:, :k] = state.mask.index_select(0, index)[:, :k]
    state.mask = mask
    if state.pad is not None:
        state.pad = state.pad.index_select(0, index)
    state.rows = rows


def gather(state: StaticState, index: torch.Tensor) -> None:
    """Rows k := old rows index[k] (resampling): in place while the buffers hold the rows,
    else into new eager buffers."""
    n = index.numel()
    if n > state.cache.capacity[0]:  # more rows than the buffers hold
        if state.compiled:
            detach(state)
        grow(state, n, state.cache.capacity[1], index)
        return
    state.cache.gather_(index, state.length)
    for name in ("mask", "pad"):
        t = getattr(state, name)
        if t is not None:
            t[:n] = t[index]
    state.rows = state.cache.rows = n


def admit(state: StaticState, layers: Layers, rows: int, width: int,
          mask: torch.Tensor | None, pad: torch.Tensor | None, budget: int | None) -> None:
    """Add the rows of a prefill of P prompts (`layers`, P rows and `width` slots; `mask` and
    `pad` per prompt, None when no prompt is padded), each prompt shared by `rows` rows, after
    the state's rows (right-aligned, as `TransformersLM.extend` says), with room for `budget`
    generated tokens.

    The new rows are written in place when the buffers have the rows and slots for them (they
    are allocated with room to spare), so an admission costs about its own rows, not a copy
    of the whole batch. The state is first repacked (`repack`) otherwise, when a prompt is
    longer than the slots written so far, and when the slots before every running row's first
    token (left by rows that have finished) are at least as many as the slots in use. So a
    batch that never empties (a server under steady load) holds at most about twice its
    longest running row's slots, not one more per step for as long as it lives. The state
    steps eagerly afterwards (one new shape per admission would be a new compilation)."""
    if state.compiled:
        detach(state)
    old, new = state.rows, layers[0][0].shape[0] * rows
    gen = row_slots(budget, new, EAGER_SLOTS)
    drop = 0  # slots before every running row's first token
    if state.pad is not None:
        drop = int(state.pad[:old].min()) if old else state.length
    rows_cap, slots_cap = state.cache.capacity
    if (width > state.length or drop >= max(state.length - drop, 1)
            or old + new > rows_cap or state.length + gen > slots_cap):
        repack(state, drop, width, old + new, gen)
    c, t = state.cache, state.length
    if state.pad is None:  # every running row starts at slot 0
        state.pad = torch.zeros(c.capacity[0], dtype=torch.long, device=state.mask.device)
    start = t - width  # first slot of the new rows' (padded) prompts
    c.load_(layers, rows, row=old, slot=start)
    rows_new = slice(old, old + new)
    state.mask[rows_new] = False
    state.mask[rows_new, start:t] = True if mask is None else \
        mask.bool().repeat_interleave(rows, 0)
    state.pad[rows_new] = start + (0 if pad is None else pad.repeat_interleave(rows, 0))
    state.rows = c.rows = old + new


def repack(state: StaticState, drop: int, width: int, rows: int, gen: int) -> None:
    """New eager buffers for a state that will hold `rows` rows: the running rows' slots
    from `drop` on move left by `drop` (their positions, hence their RoPE keys, are
    unchanged: only the padding counts change), then right as far as a `width`-slot
    prompt needs; half as many rows again as needed and room for twice `gen` generated
    slots, so that the next admissions write in place. Only the slots in use are written
    (the others are written before any row reads them: a step's token, an admission)."""
    c, old, t, device = state.cache, state.rows, state.length, state.mask.device
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
    mask = torch.zeros((cap, slots), dtype=torch.bool, device=device)
    mask[:old, shift:length] = state.mask[:old, drop:t]
    pad = torch.zeros(cap, dtype=torch.long, device=device)
    if state.pad is not None:
        pad[:old] = state.pad[:old] - drop
    pad[:old] += shift
    buf.rows, buf.write = old, length
    state.cache, state.mask, state.pad = buf, mask, pad
    state.length = length
    state.prompt_len = max(0, state.prompt_len + shift - drop)
