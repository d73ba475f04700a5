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
    """

    def __init__(self, ll, model, streams: int, cells: int, threads: int,
                 max_batch: int) -> None:
        p = ll.llama_context_default_params()
        p.n_ctx = streams * cells
        p.n_batch = max_batch
        p.n_ubatch = min(max_batch, 512)
        p.n_seq_max = streams
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = False  # a stream per sequence: a row's attention reads its cells only
        p.no_perf = True
        self.ll, self.streams, self.cells = ll, streams, cells
        self.ctx = ll.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {streams} x {cells} "
                               "cells: " + "".join(LOG_TAIL[-3:]).strip())
        self.cells = int(ll.llama_n_ctx_seq(self.ctx))  # llama.cpp pads it (to 256)
        self.mem = ll.llama_get_memory(self.ctx)
        self.reset()

    def reset(self) -> None:
        """Forget every sequence and cell (the context is idle)."""
        self.ll.llama_memory_clear(self.mem, False)
        self.used = np.zeros(self.streams, dtype=bool)  # sequence ids held by a state
        self.length = np.zeros(self.streams, dtype=np.int64)  # cells each sequence holds

    def take(self, k: int, prefer: np.ndarray | None = None) -> np.ndarray:
        """k free sequence ids: the free ones of `prefer` first (in its order), then the
        lowest free ones."""
        if k > self.streams - self.live:
            raise InputError("rows", f"at most {self.streams} live rows in this llama.cpp "
                             "context", self.live + k)
        free = np.flatnonzero(~self.used)
        if prefer is not None and prefer.size:
            mine = prefer[~self.used[prefer]]
            free = np.concatenate([mine, np.setdiff1d(free, mine, assume_unique=True)])
        ids = free[:k].astype(np.int32)
        self.used[ids], self.length[ids] = True, 0
        return ids

    def copy(self, src: int, dst: int, p1: int = -1) -> None:
        """dst becomes a copy of src (positions < p1, or all). llama.cpp copies the whole
        stream at its next decode; the positions from p1 on are then dropped."""
        self.ll.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.length[dst] = self.length[src]
        if 0 <= p1 < self.length[src]:
            self.ll.llama_memory_seq_rm(self.mem, dst, p1, -1)
            self.length[dst] = p1

    def wrote(self, seqs: np.ndarray, cells: int = 1) -> None:
        """Record a decode that wrote `cells` new cells for each of `seqs`."""
        self.length[seqs] += cells

    def release(self, seqs: Sequence[int]) -> None:
        for s in seqs:
            self.ll.llama_memory_seq_rm(self.mem, int(s), -1, -1)
            self.length[int(s)] = 0
            self.used[int(s)] = False

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` more sequences of at most `length` cells fit."""
        return rows <= self.streams - self.live and length <= self.cells

    def free_beside(self, seq: int) -> int | None:
        """A free sequence id next to `seq` (None if both neighbours are taken)."""
        for s in (seq + 1, seq - 1):
            if 0 <= s < self.streams and not self.used[s]:
                return s
        return None

    @property
    def live(self) -> int:
        """Sequence ids held."""
        return int(self.used.sum())

    @property
    def in_use(self) -> int:
        return int(self.length.sum())

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
    """Rows of a batch: each row's sequence id, next position, prompt length and prompt (the
    token ids it was admitted with: a later prompt that starts the same way shares its cells)."""

    seqs: Seqs
    pos: np.ndarray
    prompt_len: np.ndarray
    heads: list[tuple[int, ...]]

    @property
    def rows(self) -> int:
        return int(self.pos.size)

    @classmethod
    def empty(cls, seqs: Seqs, prompts: Sequence[Sequence[int]], rows: int) -> LlamaState:
        """A state of `rows` rows per prompt on `seqs`, nothing evaluated yet."""
        heads = [tuple(int(i) for i in p) for p in prompts]
        return cls(seqs, np.zeros(seqs.ids.size, dtype=np.int32),
                   np.repeat([len(p) for p in prompts], rows).astype(np.int32),
                   [h for h in heads for _ in range(rows)])


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
