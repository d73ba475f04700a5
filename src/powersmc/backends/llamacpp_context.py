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

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


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
    """One llama.cpp context, its pool of free sequence ids, and safe cell release.

    llama.cpp (0.3.36, CPU) computes wrong attention for a sequence whose new token is placed
    in a freed cell below one of that sequence's existing cells (measured: log-prob errors
    of 0.5 and more; tests/test_llamacpp_backend.py). New tokens always go to the lowest free
    cell, so a freed cell is safe only when it was written after the last write of every
    sequence still alive. `release` frees a sequence's cells when that holds (MH's rejected
    proposals, Scalable Power Sampling's rollouts: they are the newest cells) and otherwise
    parks them under a reserved sequence id (SMC's dropped particles, whose cells interleave
    with the survivors'), which keeps them occupied; parked cells return when the context is
    reused by the next run. A write clock per sequence decides which case applies.
    """

    PARK = MAX_SEQUENCES - 1

    def __init__(self, ll, model, cells: int, threads: int, max_batch: int) -> None:
        p = ll.llama_context_default_params()
        p.n_ctx = cells
        p.n_batch = max_batch
        p.n_ubatch = min(max_batch, 512)
        p.n_seq_max = MAX_SEQUENCES
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = True  # cells shared between sequences: what resampling needs
        p.no_perf = True
        self.ll, self.cells = ll, cells
        self.ctx = ll.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {cells} cells: "
                               + "".join(LOG_TAIL[-3:]).strip())
        self.mem = ll.llama_get_memory(self.ctx)
        self.reset()

    def reset(self) -> None:
        """Forget every sequence and cell (the context is idle)."""
        self.ll.llama_memory_clear(self.mem, True)
        self.free = list(range(self.PARK - 1, -1, -1))
        self.live = 0
        self.clock = 0
        self.first = np.full(MAX_SEQUENCES, np.inf)  # clock of a sequence's first own write
        self.own = np.zeros(MAX_SEQUENCES, dtype=np.int64)  # cells a sequence wrote itself
        self.written = 0  # cells written since the reset (each written token takes one)
        self.freed = 0  # of those, cells freed again (a released sequence's own writes)
        self.last = np.full(MAX_SEQUENCES, -np.inf)  # clock of the last write it holds
        self.alive = np.zeros(MAX_SEQUENCES, dtype=bool)

    def take(self, k: int) -> np.ndarray:
        if k > len(self.free):
            raise InputError("rows", f"at most {self.PARK} live sequences at once on the "
                             "llama.cpp backend (llama.cpp's limit)", self.live + k)
        self.live += k
        ids = np.array([self.free.pop() for _ in range(k)], dtype=np.int32)
        self.alive[ids], self.first[ids], self.last[ids] = True, np.inf, -np.inf
        self.own[ids] = 0
        return ids

    def copy(self, src: int, dst: int, p1: int = -1) -> None:
        """dst shares src's cells (positions < p1, or all): no tensor is copied."""
        self.ll.llama_memory_seq_cp(self.mem, src, dst, 0 if p1 >= 0 else -1, p1)
        self.last[dst] = self.last[src]

    def wrote(self, seqs: np.ndarray, cells: int = 1) -> None:
        """Record a decode that wrote `cells` new cells for each of `seqs`."""
        self.clock += 1
        self.own[seqs] += cells
        self.written += cells * len(seqs)
        self.first[seqs] = np.minimum(self.first[seqs], self.clock)
        self.last[seqs] = self.clock

    def release(self, seqs: Sequence[int]) -> None:
        if not len(seqs):
            return
        ids = np.asarray(seqs, dtype=np.int64)
        self.alive[ids] = False
        newest = self.last[self.alive].max(initial=-np.inf)
        for s in ids.tolist():
            if not self.first[s] > newest:  # its cells may sit below a survivor's: park them
                self.ll.llama_memory_seq_cp(self.mem, s, self.PARK, -1, -1)
            else:
                self.freed += int(self.own[s])
            self.ll.llama_memory_seq_rm(self.mem, s, -1, -1)
            self.free.append(s)
        self.live -= len(ids)

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
