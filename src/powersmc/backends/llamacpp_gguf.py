"""A GGUF model as llama.cpp loads it (`GGUFModel`): the weights in the format chosen (the
file's own, or an F16 / BF16 / Q8_0 copy written once to the cache), metadata, EOS ids, the
tokenizer and the chat template. The batched KV cache over it is `backends.llamacpp_lm`."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from powersmc.backends.convert import cache_dir, cache_key
from powersmc.backends.llamacpp_context import LOG_TAIL, lib, quiet_logs
from powersmc.backends.protocol import END_TOKENS
from powersmc.errors import InputError

COPIES = {"f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype of each copy (llama.h)
WEIGHTS = ("auto", "file", *COPIES)
NO_GEMM_FTYPES = (3, 9)  # LLAMA_FTYPE_MOSTLY_Q4_1, _Q5_1: no batched CPU matmul kernel


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroups, pytest-xdist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class GGUFModel:
    """A GGUF file loaded by llama.cpp: its weights (the file's or a copy), metadata, EOS ids,
    tokenizer and chat template; `LlamaCppLM` adds the batched KV cache.

    Args:
        path: the .gguf file.
        threads: CPU threads for every decode (default: all cores).
        chat: apply the GGUF's chat template to text prompts (default; a GGUF without a
            template is then an error) or use raw text prompts (False).
        system_prompt: optional system message for chat prompts.
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
        self.threads = threads or usable_cores()
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
        self.name = name or f"{self._meta('general.name') or self.path.stem} (GGUF, llama.cpp)"


    def __del__(self) -> None:
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
    params.nthread = usable_cores()
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
