"""llama.cpp's C side for `LlamaCppLM` (`backends.llamacpp_lm`): the bindings and their log,
one context's KV cells and sequence ids (`Context`), a state's rows (`LlamaState`) and the
reusable batch buffer (`Batch`)."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from powersmc.errors import InputError

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: the most streams of a context


def lib():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - the package is a core dependency
        raise InputError("backend", "'transformers': llama-cpp-python is not installed "
                         "(pip install llama-cpp-python)") from exc
    return llama_cpp


LOG_TAIL: list[str] = []


_LOG = logging.getLogger("powersmc.llama_cpp")
_LOG_CALLBACK: list[Any] = []  # the installed callback: the C side holds a raw pointer to it


def quiet_logs(ll) -> None:
    """Route llama.cpp's logging into a short buffer (kept for error messages), not stderr;
    also to the `powersmc.llama_cpp` logger at debug (`powersmc --log-level debug`)."""
    if _LOG_CALLBACK:
        return

    @ll.llama_log_callback
    def callback(level, text, user_data):
        line = text.decode("utf-8", "replace")
        LOG_TAIL.append(line)
        del LOG_TAIL[:-20]
        if _LOG.isEnabledFor(logging.DEBUG) and line.strip():
            _LOG.debug(line.rstrip())

    _LOG_CALLBACK.append(callback)
    ll.llama_log_set(callback, ctypes.c_void_p(0))


class Context:
    """One llama.cpp context in its non-unified mode: `streams` KV streams of `cells` cells
    each, one sequence per stream (sequence id = stream).

    Why not the unified cache, where one cell can belong to many sequences: there every row's
    attention walks every occupied cell of the context, so P systems batched together cost
    each row P times the attention of one system alone (measured, 2-core CPU, default model,
    16-row systems: 3.7 ms per row per step at 4 systems, 4.4 at 8, against 3.2 alone); and
    it needed workarounds (parked cells, a 48-row decode split). With a stream per sequence a
    row attends to its own cells only (2.5 ms per row at 4 systems, 2.4 at 8: no penalty;
    docs/backends.md). The price is that sharing a row (resampling's duplicates, a prompt's
    rows, a program's kept prefix) copies its stream, all `cells` of it, instead of tagging
    cells: llama.cpp copies whole streams only, so a prefix is copied whole, then trimmed.

    One llama_decode runs its tokens in micro-batches whose sequence ids are consecutive
    (llama.cpp's split for non-unified caches: a micro-batch's attention views one range of
    streams). So a state keeps its rows' ids one contiguous range (`LlamaCppLM._compact`) and
    feeds them sorted: one micro-batch per step, as the unified cache had.

    Prompt cache: `heads[s]` is the prompt whose cells sequence s holds at positions
    0..len-1, evaluated as a prompt (`LlamaCppLM._prompts`) or copied from one that was. A
    released sequence keeps its prompt's cells (not its generated ones) while its stream is
    free, and free streams holding a prompt are taken last, oldest first (`take`). So a
    request whose prompt starts as a finished one's (an MH chain's next proposal: the prompt
    and the kept prefix) continues those cells instead of evaluating them again, even when no
    live row holds them: in place when it joins the running state whose row just finished
    (`llamacpp_prompts.placement`; until then the rows stay around that free stream, which
    `LlamaCppLM._feed` pads), else by a copy. Only prompt cells are shared, never generated
    ones: a prompt cell's bits do not depend on which decode wrote it
    (`llamacpp_prompts.chunk_bounds`), so sharing changes no result.
    """

    def __init__(self, ll, model, streams: int, cells: int, threads: int,
                 max_batch: int, cache: bool = True) -> None:
        p = ll.llama_context_default_params()
        p.n_ctx = streams * cells
        p.n_batch = max_batch
        p.n_ubatch = min(max_batch, 512)
        p.n_seq_max = streams
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = False  # a stream per sequence: a row's attention reads its cells only
        p.no_perf = True
        self.ll, self.streams, self.cells, self.cache = ll, streams, cells, cache
        self.ctx = ll.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {streams} x {cells} "
                               "cells: " + "".join(LOG_TAIL[-3:]).strip())
        self.cells = int(ll.llama_n_ctx_seq(self.ctx))  # llama.cpp pads it (to 256)
        self.mem = ll.llama_get_memory(self.ctx)
        self.reset()

    def reset(self) -> None:
        """Forget every sequence and cell."""
        self.ll.llama_memory_clear(self.mem, False)
        self.used = np.zeros(self.streams, dtype=bool)  # sequence ids held by a state
        self.length = np.zeros(self.streams, dtype=np.int64)  # cells each sequence holds
        self.heads: dict[int, tuple[int, ...]] = {}  # the prompt cache (class docstring)
        self.freed = np.zeros(self.streams, dtype=np.int64)  # when each was released
        self._clock = 0

    def take(self, k: int, prefer: np.ndarray | None = None) -> np.ndarray:
        """k free sequence ids: the free ones of `prefer` first (in its order); without
        `prefer`, the lowest run of k consecutive free ids holding no cached prompt, or
        failing that of k free ids. Otherwise the lowest free ids holding no cached prompt,
        then those that do, the longest freed first. An id taken keeps its cells until its
        state writes it (`copy` into it, or `keep`)."""
        if k > self.streams - self.live:
            raise InputError("rows", f"at most {self.streams} live rows in this llama.cpp "
                             "context", self.live + k)
        free = ~self.used
        clean = free.copy()
        clean[list(self.heads)] = False
        if prefer is None:
            for mask in (clean, free):
                run = np.concatenate([[0], np.cumsum(mask)])
                starts = np.flatnonzero(run[k:] - run[:-k] == k) if k else np.array([0])
                if starts.size:
                    ids = np.arange(starts[0], starts[0] + k, dtype=np.int32)
                    self.used[ids] = True
                    return ids
        cached = np.flatnonzero(free & ~clean)
        order = [np.flatnonzero(clean), cached[np.argsort(self.freed[cached], kind="stable")]]
        if prefer is not None and prefer.size:
            mine = prefer[free[prefer]]
            order = [mine] + [o[~np.isin(o, mine)] for o in order]
        ids = np.concatenate(order)[:k].astype(np.int32)
        self.used[ids] = True
        return ids

    def keep(self, seq: int, cells: int) -> None:
        """A newly taken sequence keeps its first `cells` cells (of its own cached prompt;
        0: none) and is then written from there."""
        if cells:
            self.ll.llama_memory_seq_rm(self.mem, seq, cells, -1)
            self.heads[seq] = self.heads[seq][:cells]
        else:
            self.ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
            self.heads.pop(seq, None)
        self.length[seq] = cells

    def copy(self, src: int, dst: int, p1: int = -1) -> None:
        """dst becomes a copy of src (positions < p1, or all). llama.cpp copies the whole
        stream at its next decode (in the order of the calls, over whatever dst held); the
        positions from p1 on are then dropped."""
        self.ll.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.length[dst] = self.length[src]
        head = self.heads.get(src)
        if 0 <= p1 < self.length[src]:
            self.ll.llama_memory_seq_rm(self.mem, dst, p1, -1)
            self.length[dst] = p1
            if head is not None and p1 < len(head):
                head = head[:p1]
        if head is None:
            self.heads.pop(dst, None)
        else:
            self.heads[dst] = head

    def evaluated(self, seq: int, prompt: tuple[int, ...]) -> None:
        """Record that `seq` now holds `prompt`'s cells, evaluated as a prompt."""
        self.heads[seq] = prompt

    def wrote(self, seqs: np.ndarray, cells: int = 1) -> None:
        """Record a decode that wrote `cells` new cells for each of `seqs`."""
        self.length[seqs] += cells

    def release(self, seqs: Sequence[int]) -> None:
        """Free `seqs`. With `cache` on, the first of them to hold a prompt that no other
        sequence holds keeps its prompt's cells (the rest are removed) for later prompts; the
        others are cleared."""
        gone = list(dict.fromkeys(int(s) for s in seqs))
        leaving = set(gone)
        held = {id(h) for s, h in self.heads.items() if s not in leaving}
        for s in gone:
            self.used[s] = False
            head = self.heads.get(s)
            if self.cache and head is not None and id(head) not in held:
                held.add(id(head))
                self._clock += 1
                self.freed[s] = self._clock
                self.ll.llama_memory_seq_rm(self.mem, s, len(head), -1)
                self.length[s] = len(head)
            else:
                self.keep(s, 0)

    def donors(self, exclude: np.ndarray) -> list[tuple[tuple[int, ...], int]]:
        """(prompt, sequence) for each distinct cached prompt, live or free, except in the
        sequences `exclude` (a new state's, about to be written)."""
        out: dict[int, tuple[tuple[int, ...], int]] = {}
        skip = set(exclude.tolist())
        for s, head in self.heads.items():
            if s not in skip:
                out.setdefault(id(head), (head, s))
        return list(out.values())

    def pads(self, ids: np.ndarray) -> np.ndarray:
        """Free sequence ids to decode a dummy token in beside `ids` (sorted): those between
        them, or for a lone id a neighbour holding no cached prompt if there is (see
        `LlamaCppLM._feed`: why). Each gets its token at its own next position."""
        lo, hi = int(ids[0]), int(ids[-1])
        if hi - lo + 1 > ids.size:
            return np.setdiff1d(np.arange(lo, hi + 1), ids).astype(np.int32)
        if ids.size > 1:
            return np.zeros(0, dtype=np.int32)
        near = [s for s in (lo + 1, lo - 1) if 0 <= s < self.streams and not self.used[s]]
        near.sort(key=lambda s: s in self.heads)
        return np.array(near[:1], dtype=np.int32)

    def holes_cached(self, ids: np.ndarray) -> bool:
        """Whether every free id between the sorted `ids` holds a cached prompt (or none is
        free): the state's rows may then stay where they are, those ids padded."""
        holes = np.setdiff1d(np.arange(int(ids[0]), int(ids[-1]) + 1), ids)
        return all(int(h) in self.heads for h in holes)

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` more sequences of at most `length` cells fit."""
        return rows <= self.streams - self.live and length <= self.cells

    @property
    def live(self) -> int:
        """Sequence ids held."""
        return int(self.used.sum())

    @property
    def in_use(self) -> int:
        """Cells the live sequences hold."""
        return int(self.length[self.used].sum())

    def __del__(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx and self.ll.llama_free is not None:  # None at interpreter shutdown
            self.ll.llama_free(ctx)


class Seqs:
    """The sequence ids a state holds; released to its context when the state is dropped."""

    def __init__(self, ctx: Context, ids: np.ndarray) -> None:
        self.ctx, self.ids = ctx, ids


def release_seqs(seqs: Seqs) -> None:
    seqs.ctx.release(seqs.ids.tolist())
    seqs.ids = seqs.ids[:0]


@dataclass
class LlamaState:
    """Rows of a batch: each row's sequence id, next position and prompt length."""

    seqs: Seqs
    pos: np.ndarray
    prompt_len: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.pos.size)

    @classmethod
    def empty(cls, seqs: Seqs, prompts: Sequence[Sequence[int]], rows: int) -> LlamaState:
        """A state of `rows` rows per prompt on `seqs`, nothing evaluated yet."""
        return cls(seqs, np.zeros(seqs.ids.size, dtype=np.int32),
                   np.repeat([len(p) for p in prompts], rows).astype(np.int32))


class Batch:
    """A reusable `llama_batch` whose arrays are numpy-owned, filled without Python loops."""

    def __init__(self, ll, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq.ctypes.data
        self.seq_ptrs = np.arange(capacity, dtype=np.uint64) * 4 + np.uint64(base)
        c = ctypes
        self.batch = ll.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(c.POINTER(ll.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(c.POINTER(ll.llama_pos)),
            n_seq_id=self.n_seq.ctypes.data_as(c.POINTER(c.c_int32)),
            seq_id=self.seq_ptrs.ctypes.data_as(c.POINTER(c.POINTER(ll.llama_seq_id))),
            logits=self.logits.ctypes.data_as(c.POINTER(c.c_int8)),
        )
