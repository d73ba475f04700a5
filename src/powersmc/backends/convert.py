"""Derived copies of a model, written once to the cache (`POWERSMC_CACHE` or ~/.cache/powersmc).

* `hf_directory`: a Transformers directory (config.json, float32 safetensors, tokenizer with its
  chat template) of a GGUF file, for engines that load only that format (vLLM). The GGUF's
  tensors are de-quantised by Transformers exactly as `load_model(backend="transformers")`
  reads them, so both backends run the same float32 weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from powersmc.errors import InputError


def cache_dir() -> Path:
    """Where derived model copies live: $POWERSMC_CACHE, else ~/.cache/powersmc."""
    return Path(os.environ.get("POWERSMC_CACHE", Path.home() / ".cache" / "powersmc"))


def cache_key(path: Path) -> str:
    """A file's cache name: its stem, size and content digest. The same file installed again
    (a fresh virtual environment, a new modification time) finds its copies; a changed file
    gets new ones. Hashing reads the file once (about 0.1 s per 100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"{path.stem}-{path.stat().st_size}-{digest.hexdigest()[:16]}"


def hf_directory(gguf: Path) -> Path:
    """A Transformers directory holding the de-quantised (float32) weights of `gguf`, its
    configuration and its tokenizer (chat template included); written once, atomically.

    A GGUF-quantised Transformers model refuses `save_pretrained`, so the model is rebuilt from
    its configuration (no quantisation entry) and given the de-quantised state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = cache_dir() / f"{cache_key(gguf)}-hf"
    if (dst / "config.json").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError("model", f"{gguf} could not be read by Transformers for conversion: "
                         f"{exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, dst)
        except OSError:  # another process wrote it first
            if not (dst / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
