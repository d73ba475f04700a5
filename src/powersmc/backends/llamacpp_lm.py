"""llama.cpp backend: GGUF models run natively (quantised weights) through llama-cpp-python.

Built on the low-level API (pinned in pyproject). One llama.cpp context holds every row of a
state, each row one sequence in its own KV stream (`llamacpp_context.Context`: why):

* `prefill_many` evaluates each prompt once, under one sequence, then copies that stream to
  the other rows of the prompt (nothing is re-evaluated);
* `step` evaluates one token per row in one `llama_decode`, each row with its own sequence and
  position, and reads the logits buffer once as a [rows, V] tensor;
* `reorder` (resampling, finished rows leaving) keeps a row's sequence where it can, copies a
  duplicated row's stream to a fresh sequence, and frees the sequences no row uses any more.

Each state owns its sequence ids and releases them when it is garbage-collected. A context
is sized for the rows and row length a state asks for and reused across runs.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from powersmc.backends.llamacpp_context import (
    LOG_TAIL,
    MAX_SEQUENCES,
    Batch,
    Context,
    LlamaState,
    Seqs,
    release_seqs,
)
from powersmc.backends.llamacpp_gguf import GGUFModel
from powersmc.backends.llamacpp_prompts import chunk_bounds, placement, shared_prefix

ROW_TOKENS = 1024  # generated tokens a row holds when a prefill gives no budget
MIN_STREAMS = 16  # a context's fewest streams (rows), so that small runs reuse one context


class LlamaCppLM(GGUFModel):
    """`LanguageModel` over a GGUF file run by llama.cpp (CPU; GPU offload if the build has it).

    Args: those of `GGUFModel` (path, threads, chat, system_prompt, eos_token_ids,
    gpu_layers, name, weights), passed on to it, and
        n_ctx: KV cells per row: the longest prompt plus generated tokens a row can hold
            (default: sized per prefill from its prompts and `budget`).
        prompt_cache: keep finished rows' prompt cells for later prompts that start the same
            way (`Context`); off, every freed stream is cleared (for comparison: results are
            the same either way, `benchmarks/prompt_cache.py`).
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int | None = None,
                 prompt_cache: bool = True, **model: Any) -> None:
        super().__init__(path, **model)
        self.n_ctx, self.prompt_cache = n_ctx, prompt_cache
        self.tokens_decoded = 0  # every token llama.cpp has evaluated (prompts, steps, pads)
        self.max_rows: int | None = MAX_SEQUENCES  # a stream per row
        self.joins_running = True
        self._ctx: Context | None = None
        self._batch = Batch(self.ll, 512)  # >= MAX_SEQUENCES rows per step; prompt chunks

    def __del__(self) -> None:
        self._ctx = None
        super().__del__()

    # --- the protocol ---------------------------------------------------------------------

    def _context(self, streams: int, cells: int) -> Context:
        """A context of at least `streams` streams of `cells` cells: the cached one if no
        state still uses it and it is large enough (its prompt cache kept)."""
        streams = min(MAX_SEQUENCES, max(MIN_STREAMS, 1 << (streams - 1).bit_length()))
        cells = self.n_ctx or int(math.ceil(cells / 256) * 256)
        ctx = self._ctx
        if ctx is not None and ctx.live == 0:
            if ctx.streams >= streams and ctx.cells >= cells:
                return ctx
            self._ctx = ctx = None  # too small and unused: free it first
        ctx = Context(self.ll, self.model, streams, cells, self.threads, self._batch.capacity,
                      self.prompt_cache)
        self._ctx = ctx
        return ctx

    def _decode(self, ctx: Context, n: int) -> None:
        self._batch.batch.n_tokens = n
        self.tokens_decoded += n
        rc = self.ll.llama_decode(ctx.ctx, self._batch.batch)
        if rc == 1:
            raise RuntimeError(
                f"llama.cpp's KV cache is full ({ctx.cells} cells per row): load the model "
                "with a larger n_ctx, or use fewer tokens")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}: "
                               + "".join(LOG_TAIL[-2:]).strip())

    def _logprobs(self, ctx: Context, rows: int, places: np.ndarray | None) -> torch.Tensor:
        """The rows' next-token log-probs from the last decode's logits (row k's at place k,
        or at places[k])."""
        ptr = self.ll.llama_get_logits(ctx.ctx)
        width = rows if places is None else int(places.max()) + 1
        raw = np.ctypeslib.as_array(ptr, shape=(width, self.vocab_size))  # zero-copy view
        with record_function("powersmc.normalize"):
            if places is not None:
                raw = raw[places]
            return torch.log_softmax(torch.from_numpy(raw), dim=-1)

    def prefill(self, prompt_ids: Sequence[int], rows: int, *,
                budget: int | None = None) -> tuple[LlamaState, torch.Tensor]:
        return self.prefill_many([prompt_ids], rows, budget=budget)

    def prefill_many(self, prompts: Sequence[Sequence[int]], rows: int, *,
                     budget: int | None = None,
                     room: tuple[int, int] | None = None) -> tuple[LlamaState, torch.Tensor]:
        """Evaluate each prompt once and copy it to its `rows` rows.

        budget: tokens the rows will generate, all together (sizes each row's cells; default
        `ROW_TOKENS` per row). room: (rows, length) the state should also be able to hold at
        once, for later `extend`s (rows of at most `length` cells each, prompt included).
        """
        n = len(prompts) * rows
        per = ROW_TOKENS if budget is None else -(-budget // n)
        length = max(len(p) for p in prompts) + per + 1
        want_rows, want_len = room or (0, 0)
        ctx = self._context(max(n, want_rows), max(length, want_len))
        seqs = Seqs(ctx, ctx.take(n))
        state = LlamaState.empty(seqs, prompts, rows)
        weakref.finalize(state, release_seqs, seqs)
        return state, self._prompts(ctx, state, prompts, rows)

    def _prompts(self, ctx: Context, state: LlamaState, prompts: Sequence[Sequence[int]],
                 rows: int) -> torch.Tensor:
        """Evaluate each prompt once under its first row's sequence and copy it to its other
        rows; returns every row's next-token logprobs. A prompt that starts as one the
        context holds (a live row's, a finished row's kept in the prompt cache: `Context`,
        or an earlier prompt here) copies those cells for the common part, all but its last
        token, and evaluates only the rest (prefix sharing: a program's requests continue
        the same prompt again and again)."""
        seqs = state.seqs
        first = seqs.ids[::rows]
        known = ctx.donors(seqs.ids)  # a new row's own cached prompt is its first donor
        last = np.zeros((len(prompts), self.vocab_size), dtype=np.float32)
        # One prompt per llama_decode (in `chunk_bounds`), logits at its last token:
        # a batch holding several tokens of several sequences gave wrong logits on llama.cpp
        # 0.3.36 (measured; tests/test_llamacpp_backend.py), one sequence per batch does not.
        b = self._batch
        for p, (prompt, seq) in enumerate(zip(prompts, first.tolist(), strict=True)):
            ids, head = np.asarray(prompt, dtype=np.int32), tuple(int(i) for i in prompt)
            own = [(ctx.heads[seq], seq)] if seq in ctx.heads else []
            start, src = shared_prefix(own + known, head)
            cuts = chunk_bounds(start, ids.size)
            if cuts[0] > 0 and src != seq:
                ctx.copy(src, seq, cuts[0])
            else:
                ctx.keep(seq, cuts[0])
            for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
                n = hi - lo
                b.token[:n], b.pos[:n] = ids[lo:hi], np.arange(lo, hi)
                b.seq[:n], b.n_seq[:n], b.logits[:n] = seq, 1, 0
                b.logits[n - 1] = hi == ids.size
                self._decode(ctx, n)
                ctx.wrote(np.array([seq]), n)
            ctx.evaluated(seq, head)
            known.append((head, seq))
            ptr = self.ll.llama_get_logits(ctx.ctx)
            last[p] = np.ctypeslib.as_array(ptr, shape=(1, self.vocab_size))[0]
        for p, src in enumerate(first.tolist()):
            for dst in seqs.ids[p * rows + 1 : (p + 1) * rows].tolist():
                ctx.copy(src, dst)
        state.pos[:] = state.prompt_len
        logp = torch.log_softmax(torch.from_numpy(last), dim=-1)
        return logp.repeat_interleave(rows, 0)

    def extend(self, state: LlamaState, prompts: Sequence[Sequence[int]], rows: int, *,
               budget: int | None = None) -> torch.Tensor:
        """Append `rows` rows per prompt to a running state, in its context (a system joining
        the batch: `runtime.scheduler`); returns the new rows' next-token logprobs. The caller
        checks `fits` first (`budget` is not used here)."""
        ctx, ids, k = state.seqs.ctx, state.seqs.ids, len(prompts) * rows
        near = None  # the free ids between the state's rows, then after them, then before
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max()) + 1
            after = np.arange(hi, min(hi + k, ctx.streams))
            near = np.concatenate([
                np.setdiff1d(np.arange(lo, hi), ids),
                after if after.size == k and not ctx.used[after].any() else np.arange(
                    lo - 1, max(lo - k, 0) - 1, -1)])
            if near.size >= k:
                heads = [tuple(int(i) for i in p) for p in prompts]
                near = placement(near, heads, rows, ctx.heads)
        new = LlamaState.empty(Seqs(ctx, ctx.take(k, near)), prompts, rows)
        logp = self._prompts(ctx, new, prompts, rows)
        state.seqs.ids = np.concatenate([state.seqs.ids, new.seqs.ids])
        state.pos = np.concatenate([state.pos, new.pos])
        state.prompt_len = np.concatenate([state.prompt_len, new.prompt_len])
        new.seqs.ids = new.seqs.ids[:0]  # now held by `state`
        self._compact(state, keep_cached=True)
        return logp

    def fits(self, state: LlamaState, rows: int, length: int) -> bool:
        """Whether `rows` more rows of at most `length` cells each (prompt included) fit in
        the state's context beside its rows (a free stream each, long enough)."""
        return state.seqs.ctx.fits(rows, length)

    def cells_in_use(self, state: LlamaState) -> int | None:
        """Cells the live sequences of the state's context hold."""
        return state.seqs.ctx.in_use

    def _feed(self, state: LlamaState, tokens: np.ndarray) -> np.ndarray | None:
        """One decode: each row's next token at its own position, logits for every one of
        them (the caller then records the write: `_fed`). Returns each row's place in the
        decode (None: row k at place k).

        The rows go in the order of their sequence ids, which are consecutive (one
        micro-batch: `Context`): free ids left between them by finished rows whose prompts
        are cached (`_compact`), and for a lone row a free id beside it, get a dummy row each,
        whose cell is dropped after. Why the lone row's: the matmuls of a one-token decode
        take llama.cpp's vector kernel, whose rounding differs from the batched kernel, which
        gives every row of any larger decode the same bits whatever else the decode holds
        (measured). So a row's log-probs, and a seeded system's answer, do not depend on
        what shares its batch (tested)."""
        self._compact(state, keep_cached=True)
        n, b, ids, ctx = state.rows, self._batch, state.seqs.ids, state.seqs.ctx
        order = None if n < 2 or bool((ids[1:] > ids[:-1]).all()) else np.argsort(ids)
        pads = ctx.pads(ids if order is None else ids[order])
        if pads.size:
            tokens = np.concatenate([tokens, np.full(pads.size, tokens[0])])
            ids = np.concatenate([ids, pads])
            order = np.argsort(ids)
        r = slice(None) if order is None else order
        m = ids.size
        b.token[:m], b.seq[:m] = tokens[r], ids[r]
        b.pos[:m] = np.concatenate([state.pos, ctx.length[pads]])[r]
        b.n_seq[:m], b.logits[:m] = 1, 1
        try:
            self._decode(ctx, m)
        finally:
            for h in pads.tolist():
                self.ll.llama_memory_seq_rm(ctx.mem, h, int(ctx.length[h]), -1)
        return None if order is None else np.argsort(order)[:n]

    def _fed(self, state: LlamaState) -> None:
        state.seqs.ctx.wrote(state.seqs.ids)
        state.pos += 1

    def step(self, state: LlamaState, tokens: torch.Tensor) -> torch.Tensor:
        places = self._feed(state, tokens.numpy())
        self._fed(state)
        return self._logprobs(state.seqs.ctx, state.rows, places)

    def _compact(self, state: LlamaState, *, keep_cached: bool = False) -> None:
        """Make the state's sequence ids one contiguous range (see `Context`): the rows
        outside the window of that size holding most of them move into its free ids (a
        stream copy each). With `keep_cached`, free ids between the rows that all hold
        cached prompts stay (a finished request's, which its program's next request is
        likely to continue: `_feed` pads them)."""
        ctx, ids = state.seqs.ctx, state.seqs.ids
        n = ids.size
        srt = np.sort(ids)
        if n == 0 or srt[-1] - srt[0] == n - 1 or (keep_cached and ctx.holes_cached(srt)):
            return
        starts = np.clip(srt, 0, ctx.streams - n)
        inside = np.searchsorted(srt, starts + n) - np.searchsorted(srt, starts)
        lo = int(starts[int(np.argmax(inside))])
        out = np.flatnonzero((ids < lo) | (ids >= lo + n))
        holes = ctx.take(out.size, np.setdiff1d(np.arange(lo, lo + n), ids))
        for r, h in zip(out.tolist(), holes.tolist(), strict=True):
            ctx.copy(int(ids[r]), h)
        ctx.release(ids[out].tolist())
        ids[out] = holes

    def reorder(self, state: LlamaState, index: torch.Tensor) -> None:
        """Row k becomes old row index[k]: a row's first use keeps its sequence, repeats get
        fresh sequences holding a copy of its stream, and sequences no row uses are removed
        (first, so that a full batch can be resampled within the context's streams)."""
        idx = index.cpu().numpy().astype(np.int64)
        ctx, old = state.seqs.ctx, state.seqs.ids
        _, first = np.unique(idx, return_index=True)
        repeat = np.ones(idx.size, dtype=bool)
        repeat[first] = False
        new = old[idx].copy()
        gone = np.setdiff1d(old, new[~repeat], assume_unique=True)
        ctx.release(gone.tolist())
        fresh = ctx.take(int(repeat.sum()), gone)
        for k, dst in zip(np.flatnonzero(repeat).tolist(), fresh.tolist(), strict=True):
            ctx.copy(int(old[idx[k]]), dst)
        new[repeat] = fresh
        state.seqs.ids = new
        state.pos, state.prompt_len = state.pos[idx], state.prompt_len[idx]

    def sample_native(self, state: LlamaState, tokens: torch.Tensor, steps: int,
                      temperature: float, seed: int) -> np.ndarray:
        """Feed `tokens` and decode `steps` more tokens per row with llama.cpp's own sampler
        chain (temperature + dist, in C): the reference that SMC's overhead is measured against
        in `powersmc bench`. No EOS stop. Returns the sampled ids [rows, steps]."""
        ll, n = self.ll, state.rows
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(temperature))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        out = np.zeros((n, steps), dtype=np.int32)
        tok = tokens.numpy().astype(np.int32)
        try:
            for t in range(steps):
                places = self._feed(state, tok)  # one decode: the sampler reads its logits
                self._fed(state)                  # by place in the decode
                tok = np.array([ll.llama_sampler_sample(chain, state.seqs.ctx.ctx, int(i))
                                for i in (range(n) if places is None else places)],
                               dtype=np.int32)
                out[:, t] = tok
        finally:
            ll.llama_sampler_free(chain)
        return out

