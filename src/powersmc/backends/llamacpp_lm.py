"""llama.cpp backend: GGUF models run natively (quantised weights) through llama-cpp-python.

Built on the low-level API (pinned in pyproject). One llama.cpp context holds every row of a
state in its unified KV cache, where a cell can belong to several sequences at once:

* `prefill_many` evaluates each prompt once, under one sequence id, then shares its cells with
  the other rows of that prompt by `llama_memory_seq_cp` (no tensor is copied, nothing is
  re-evaluated);
* `step` evaluates one token per row in one `llama_decode`, each row with its own sequence id
  and position, and reads the logits buffer once as a [rows, V] tensor;
* `reorder` (resampling, finished rows leaving) keeps a row's sequence where it can, gives a
  duplicated row a fresh sequence id that shares the ancestor's cells, and removes the
  sequences no row uses any more (their cells are freed when no sequence holds them);
* `fork` (MH, Scalable Power Sampling) shares the kept prefix's cells with fresh sequence ids.

Each state owns its sequence ids and releases them when it is garbage-collected, so MH's
discarded proposals free their cells. The context is sized from the prefill's `budget`
(tokens the state and its forks will hold beyond the prompts) and reused across runs.
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from powersmc.backends.convert import cache_dir, cache_key
from powersmc.backends.llamacpp_context import (
    LOG_TAIL,
    MAX_SEQUENCES,
    Batch,
    Context,
    LlamaState,
    Seqs,
    lib,
    quiet_logs,
    release_seqs,
)
from powersmc.backends.protocol import END_TOKENS
from powersmc.errors import InputError

COPIES = {"f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype of each copy (llama.h)
WEIGHTS = ("auto", "file", *COPIES)
NO_GEMM_FTYPES = (3, 9)  # LLAMA_FTYPE_MOSTLY_Q4_1, _Q5_1: no batched CPU matmul kernel
MIN_CELLS = 4096
# Most rows per llama_decode of a step. llama.cpp's CPU attention over a decode of 64 or more
# tokens costs about tokens x occupied cells, masked cells included; below that it skips the
# cells a row cannot see. Measured on the 2-core CPU, default model, 16-row systems sharing one
# context (docs/backends.md): 4 systems 955 -> 242 ms per step, 8 systems 3340 -> 618 ms, one
# system alone unchanged (about 55 ms); 48-row and 16-row calls cost the same within 7%.
DECODE_ROWS = 48


class LlamaCppLM:
    """`LanguageModel` over a GGUF file run by llama.cpp (CPU; GPU offload if the build has it).

    Args:
        path: the .gguf file.
        threads: CPU threads for every decode (default: all cores).
        chat: apply the GGUF's chat template to text prompts (default; a GGUF without a
            template is then an error) or use raw text prompts (False).
        system_prompt: optional system message for chat prompts.
        n_ctx: KV cells of the context (default: sized per prefill from its `budget`).
        gpu_layers: layers to offload when llama-cpp-python was built with a GPU backend
            (-1: all).
        name: the model's name in reports (default: the GGUF's general.name).
        weights: 'file' runs the GGUF's own tensor types; 'f16', 'bf16' or 'q8_0' runs a
            copy in that type (written once to the cache, POWERSMC_CACHE or
            ~/.cache/powersmc, by llama.cpp's own quantizer); 'auto' (default) takes
            the F16 copy for a CPU model of at most 1B parameters stored as Q4_1 or Q5_1:
            llama.cpp has no batched (GEMM) CPU kernel for those two types, so a step over
            N rows costs about N single-row steps, while F16 batches (docs/backends.md). The
            F16 copy holds the same weights up to F16 rounding of the de-quantised values;
            of the copies it is the only one within the numerics rule of docs/backends.md
            (TV mean <= 0.002 and argmax agreement >= 99.5% against float32) on the default
            model.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        chat: bool | None = None,
        system_prompt: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        n_ctx: int | None = None,
        gpu_layers: int = 0,
        name: str | None = None,
        weights: str = "auto",
    ) -> None:
        ll = self.ll = lib()
        quiet_logs(ll)
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("model", "an existing .gguf file", str(path))
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise InputError("threads", "an integer >= 1", threads)
        self.threads = threads or os.cpu_count() or 1
        if weights not in WEIGHTS:
            raise InputError("weights", f"one of {', '.join(WEIGHTS)}", weights)
        ll.llama_backend_init()
        self.model = self._load(self.path, gpu_layers)
        ftype = int(self._meta("general.file_type") or -1)
        small = ll.llama_model_n_params(self.model) <= 1_000_000_000 and gpu_layers == 0
        self.weights = weights if weights in COPIES else "f16" if (
            weights == "auto" and ftype in NO_GEMM_FTYPES and small) else "file"
        if self.weights in COPIES:
            copy = _copy(ll, self.path, self.weights)
            ll.llama_model_free(self.model)
            self.model = self._load(copy, gpu_layers)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.vocab_size = int(ll.llama_vocab_n_tokens(self.vocab))
        self.device = torch.device("cpu")
        train_ctx = int(ll.llama_model_n_ctx_train(self.model))
        self.max_context = train_ctx or None
        self.template = self._meta("tokenizer.chat_template")
        self.chat = True if chat is None else bool(chat)
        if self.chat and self.template is None:
            raise InputError(
                "chat", f"False (raw text prompts, --raw): {self.path} has no chat template "
                "(tokenizer.chat_template); chat prompts need a GGUF that carries one", chat)
        self.system_prompt = system_prompt
        self.eos_token_ids = (tuple(int(i) for i in eos_token_ids) if eos_token_ids is not None
                              else self._default_eos())
        self.n_ctx = n_ctx
        self.max_rows: int | None = MAX_SEQUENCES - 1  # live sequences (one id is reserved)
        self.joins_running = True
        self.name = name or f"{self._meta('general.name') or self.path.stem} (GGUF, llama.cpp)"
        self._ctx: Context | None = None
        self._batch = Batch(ll, 512)  # >= MAX_SEQUENCES rows per step; prompt chunk size

    def __del__(self) -> None:
        self._ctx = None
        model, self.model = getattr(self, "model", None), None
        if model and self.ll.llama_model_free is not None:  # None at interpreter shutdown
            self.ll.llama_model_free(model)

    def _load(self, path: Path, gpu_layers: int):
        mp = self.ll.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers
        model = self.ll.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            arch = _gguf_architecture(path)
            raise InputError(
                "model",
                f"{path} could not be loaded by llama.cpp (llama-cpp-python "
                f"{self.ll.__version__}): architecture {arch!r}; supported are the architectures "
                "of that llama.cpp release (llama, qwen2, mistral, gemma, phi3, ...). "
                + "".join(LOG_TAIL[-2:]).strip())
        return model

    def _default_eos(self) -> tuple[int, ...]:
        """The model's EOS and EOT ids and the usual end-of-turn tokens it has: the same set
        as `TransformersLM` reads from the same file, so both backends share one target."""
        ids = {int(self.ll.llama_vocab_eos(self.vocab)), int(self.ll.llama_vocab_eot(self.vocab))}
        for text in END_TOKENS:
            tok = self._tokenize(text, add_special=False)
            if len(tok) == 1 and self._token_text(tok[0]) == text:
                ids.add(tok[0])
        return tuple(sorted(i for i in ids if 0 <= i < self.vocab_size))

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # a long value (chat templates can be long): read it whole
            buf = ctypes.create_string_buffer(n + 1)
            self.ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    # --- text -----------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.ll.llama_token_to_piece(self.vocab, token_id, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        out = (self.ll.llama_token * cap)()
        n = self.ll.llama_tokenize(self.vocab, raw, len(raw), out, cap, add_special, True)
        if n < 0:  # pragma: no cover - cap bounds the token count
            raise RuntimeError("llama.cpp tokenizer overflow")
        return list(out[:n])

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            return [int(i) for i in prompt]
        if not self.chat:
            return self._tokenize(prompt, add_special=True)
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.encode_chat(messages)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Prompt ids of a chat (OpenAI-style messages) through the GGUF's chat template,
        rendered with Jinja2 as Transformers renders it, with the generation prompt."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self.template is None:
            raise InputError("messages", f"a model with a chat template: {self.path} has none")
        bos = self.ll.llama_vocab_bos(self.vocab)
        eos = self.ll.llama_vocab_eos(self.vocab)
        fmt = Jinja2ChatFormatter(self.template, eos_token=self._token_text(eos) if eos >= 0
                                  else "", bos_token=self._token_text(bos) if bos >= 0 else "")
        # plain {"role", "content"} dicts: the stub asks for its own TypedDicts of them
        text = fmt(messages=list(messages)).prompt  # type: ignore[arg-type]
        return self._tokenize(text, add_special=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        ids = [int(i) for i in token_ids if int(i) not in self.eos_token_ids]
        if not ids:
            return ""
        arr = (self.ll.llama_token * len(ids))(*ids)
        cap = 16 * len(ids) + 64
        buf = ctypes.create_string_buffer(cap)
        n = self.ll.llama_detokenize(self.vocab, arr, len(ids), buf, cap, False, True)
        return buf.raw[:n].decode("utf-8", "replace")

    # --- the protocol ---------------------------------------------------------------------

    def _context(self, cells: int) -> Context:
        """A context with at least `cells` cells: the cached one if no state still uses it."""
        cells = int(math.ceil(cells / 256) * 256)
        ctx = self._ctx
        if ctx is not None and ctx.live == 0 and ctx.cells >= cells:
            ctx.reset()
            return ctx
        if ctx is not None and ctx.live == 0:  # too small and unused: free it first
            self._ctx = ctx = None
        ctx = Context(self.ll, self.model, cells, self.threads, self._batch.capacity)
        self._ctx = ctx
        return ctx

    def _decode(self, ctx: Context, n: int) -> None:
        self._batch.batch.n_tokens = n
        rc = self.ll.llama_decode(ctx.ctx, self._batch.batch)
        if rc == 1:
            raise RuntimeError(
                f"llama.cpp's KV cache is full ({ctx.cells} cells): load the model with a "
                "larger n_ctx, or use fewer particles / tokens")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}: "
                               + "".join(LOG_TAIL[-2:]).strip())

    def _logprobs(self, ctx: Context, rows: int) -> torch.Tensor:
        ptr = self.ll.llama_get_logits(ctx.ctx)
        raw = np.ctypeslib.as_array(ptr, shape=(rows, self.vocab_size))  # zero-copy view
        with record_function("powersmc.normalize"):
            return torch.log_softmax(torch.from_numpy(raw), dim=-1)  # one read, one new tensor

    def prefill(self, prompt_ids: Sequence[int], rows: int, *,
                budget: int | None = None) -> tuple[LlamaState, torch.Tensor]:
        return self.prefill_many([prompt_ids], rows, budget=budget)

    def prefill_many(self, prompts: Sequence[Sequence[int]], rows: int, *,
                     budget: int | None = None) -> tuple[LlamaState, torch.Tensor]:
        """Evaluate each prompt once and share its cells with its `rows` rows.

        budget: tokens the state and its forks will hold beyond the prompts (sizes the
        context); default: the model's training context per prompt.
        """
        total = sum(len(p) for p in prompts)
        extra = budget if budget is not None else len(prompts) * (self.max_context or 4096)
        ctx = self._context(self.n_ctx or max(total + extra + 256, MIN_CELLS))
        seqs = Seqs(ctx, ctx.take(len(prompts) * rows))
        state = _state(seqs, prompts, rows)
        weakref.finalize(state, release_seqs, seqs)
        return state, self._prompts(ctx, state, prompts, rows, None)

    def _prompts(self, ctx: Context, state: LlamaState, prompts: Sequence[Sequence[int]],
                 rows: int, donors: LlamaState | None) -> torch.Tensor:
        """Evaluate each prompt once under its first row's sequence and share its cells with
        its other rows; returns every row's next-token logprobs. A prompt that starts as the
        prompt of a row of `donors` (or of an earlier prompt here) shares that row's cells for
        the common part, all but its last token, and evaluates only the rest (prefix sharing:
        a program's requests continue the same prompt again and again)."""
        seqs = state.seqs
        first = seqs.ids[::rows]
        known: dict[tuple[int, ...], int] = {}  # a distinct prompt -> a sequence holding it
        if donors is not None:
            for head, seq in zip(donors.heads, donors.seqs.ids.tolist(), strict=True):
                known.setdefault(head, seq)
        chunk = self._batch.capacity
        last = np.zeros((len(prompts), self.vocab_size), dtype=np.float32)
        # One prompt per llama_decode (in chunks of `chunk` tokens), logits at its last token:
        # a batch holding several tokens of several sequences gave wrong logits on llama.cpp
        # 0.3.36 (measured; tests/test_llamacpp_backend.py), one sequence per batch does not.
        b = self._batch
        for p, (prompt, seq) in enumerate(zip(prompts, first.tolist(), strict=True)):
            ids = np.asarray(prompt, dtype=np.int32)
            start, src = _shared(known, state.heads[p * rows])
            if start:
                ctx.copy(src, seq, start)
            known.setdefault(state.heads[p * rows], seq)
            for lo in range(start, ids.size, chunk):
                n = min(chunk, ids.size - lo)
                b.token[:n], b.pos[:n] = ids[lo : lo + n], np.arange(lo, lo + n)
                b.seq[:n], b.n_seq[:n], b.logits[:n] = seq, 1, 0
                b.logits[n - 1] = lo + n == ids.size
                self._decode(ctx, n)
                ctx.wrote(np.array([seq]), n)
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
        keeps the context's cells within `capacity` (`budget` is not used here)."""
        ctx = state.seqs.ctx
        new = _state(Seqs(ctx, ctx.take(len(prompts) * rows)), prompts, rows)
        logp = self._prompts(ctx, new, prompts, rows, state)
        state.seqs.ids = np.concatenate([state.seqs.ids, new.seqs.ids])
        state.pos = np.concatenate([state.pos, new.pos])
        state.prompt_len = np.concatenate([state.prompt_len, new.prompt_len])
        state.heads = state.heads + new.heads
        new.seqs.ids = new.seqs.ids[:0]  # now held by `state`
        return logp

    def free_cells(self, state: LlamaState) -> int | None:
        """KV cells of the state's context that hold nothing (an upper bound on those in use
        is counted: every written token takes a cell, and only a released sequence's own
        writes free any). Cells of dropped particles interleaved with live ones stay parked
        until the context is idle (see `Context`), so a long-lived scheduler opens a fresh
        context when this runs low (`backends.particles.LMParticles`)."""
        ctx = state.seqs.ctx
        return ctx.cells - (ctx.written - ctx.freed)

    def cells_in_use(self, state: LlamaState) -> int | None:
        """Cells of the state's context written and not freed since it was last reset."""
        ctx = state.seqs.ctx
        return ctx.written - ctx.freed

    def _feed(self, state: LlamaState, tokens: np.ndarray, lo: int = 0,
              hi: int | None = None) -> None:
        """One decode of rows lo..hi: each row's next token at its own position, logits for
        every one of them (the caller then records the write: `_fed`)."""
        hi = state.rows if hi is None else hi
        n, b, r = hi - lo, self._batch, slice(lo, hi)
        b.token[:n], b.pos[:n], b.seq[:n] = tokens[r], state.pos[r], state.seqs.ids[r]
        b.n_seq[:n], b.logits[:n] = 1, 1
        self._decode(state.seqs.ctx, n)

    def _fed(self, state: LlamaState) -> None:
        state.seqs.ctx.wrote(state.seqs.ids)
        state.pos += 1

    def step(self, state: LlamaState, tokens: torch.Tensor) -> torch.Tensor:
        """Every row's next token, in decodes of at most `DECODE_ROWS` rows (see there)."""
        n, ctx, tok = state.rows, state.seqs.ctx, tokens.numpy()
        if n <= DECODE_ROWS:
            self._feed(state, tok)
            self._fed(state)
            return self._logprobs(ctx, n)
        raw = np.empty((n, self.vocab_size), dtype=np.float32)
        for lo in range(0, n, DECODE_ROWS):
            hi = min(n, lo + DECODE_ROWS)
            self._feed(state, tok, lo, hi)
            ptr = self.ll.llama_get_logits(ctx.ctx)
            raw[lo:hi] = np.ctypeslib.as_array(ptr, shape=(hi - lo, self.vocab_size))
        self._fed(state)
        with record_function("powersmc.normalize"):
            return torch.log_softmax(torch.from_numpy(raw), dim=-1)

    def reorder(self, state: LlamaState, index: torch.Tensor) -> None:
        """Row k becomes old row index[k]: a row's first use keeps its sequence, repeats get
        fresh sequences sharing its cells, and sequences no row uses are removed (first, so
        that a full batch can be resampled within llama.cpp's sequence limit)."""
        idx = index.cpu().numpy().astype(np.int64)
        ctx, old = state.seqs.ctx, state.seqs.ids
        _, first = np.unique(idx, return_index=True)
        repeat = np.ones(idx.size, dtype=bool)
        repeat[first] = False
        new = old[idx].copy()
        ctx.release(np.setdiff1d(old, new[~repeat], assume_unique=True).tolist())
        fresh = ctx.take(int(repeat.sum()))
        for k, dst in zip(np.flatnonzero(repeat).tolist(), fresh.tolist(), strict=True):
            ctx.copy(int(old[idx[k]]), dst)
        new[repeat] = fresh
        state.seqs.ids = new
        state.pos, state.prompt_len = state.pos[idx], state.prompt_len[idx]
        state.heads = [state.heads[i] for i in idx.tolist()]

    def fork(self, state: LlamaState, keep: int | None = None) -> LlamaState:
        ctx = state.seqs.ctx
        seqs = Seqs(ctx, ctx.take(state.rows))
        end = state.pos.copy() if keep is None else state.prompt_len + keep
        for src, dst, p1 in zip(state.seqs.ids.tolist(), seqs.ids.tolist(), end.tolist(),
                                strict=True):
            ctx.copy(src, dst, p1)
        out = LlamaState(seqs, end.astype(np.int32), state.prompt_len.copy(), list(state.heads))
        weakref.finalize(out, release_seqs, seqs)
        return out


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
                self._feed(state, tok)  # one decode: the sampler reads its logits by row
                self._fed(state)
                tok = np.array([ll.llama_sampler_sample(chain, state.seqs.ctx.ctx, i)
                                for i in range(n)], dtype=np.int32)
                out[:, t] = tok
        finally:
            ll.llama_sampler_free(chain)
        return out


def _copy(ll, path: Path, kind: str) -> Path:
    """A copy of a GGUF file with its weights in `kind` (f16, bf16, q8_0), in the cache
    (written once, atomically, by llama_model_quantize; about 1 s for 135M parameters), keyed
    by the source's content (`cache_key`)."""
    cache = cache_dir()
    dst = cache / f"{cache_key(path)}-{kind}.gguf"
    if dst.is_file():
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(f".tmp{os.getpid()}")
    params = ll.llama_model_quantize_default_params()
    params.ftype = COPIES[kind]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if ll.llama_model_quantize(str(path).encode(), str(tmp).encode(), ctypes.byref(params)):
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not write a {kind} copy of {path} to {cache}")
    os.replace(tmp, dst)
    return dst


def _gguf_architecture(path: Path) -> str | None:
    """general.architecture of a GGUF file (None if it is not a readable GGUF)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field else None
    except Exception:  # noqa: BLE001 - any unreadable file: report no architecture
        return None


def _state(seqs: Seqs, prompts: Sequence[Sequence[int]], rows: int) -> LlamaState:
    """A state of `rows` rows per prompt, nothing evaluated yet."""
    heads = [tuple(int(i) for i in p) for p in prompts]
    return LlamaState(seqs, np.zeros(seqs.ids.size, dtype=np.int32),
                      np.repeat([len(p) for p in prompts], rows).astype(np.int32),
                      [h for h in heads for _ in range(rows)])


def _shared(known: dict[tuple[int, ...], int], prompt: tuple[int, ...]) -> tuple[int, int]:
    """The longest prefix of `prompt`, all but its last token, that a known sequence holds:
    (its length, that sequence); (0, -1) if none."""
    best, src = 0, -1
    for head, seq in known.items():
        n = min(len(head), len(prompt) - 1)
        if n <= best:
            continue
        a, b = np.asarray(head[:n]), np.asarray(prompt[:n])
        diff = np.flatnonzero(a != b)
        k = int(diff[0]) if diff.size else n
        if k > best:
            best, src = k, seq
    return best, src
