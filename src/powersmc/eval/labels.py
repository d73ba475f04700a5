"""Display names for reports: a model or data set named as a hub id or a file name, never as a
full local path (a path says where it was on one machine, not what it was)."""

from __future__ import annotations

import os
from pathlib import Path

from powersmc.models import DEFAULT_GGUF_PACKAGE, DEFAULT_MODEL_NAME


def _is_path(name: str) -> bool:
    return (name.startswith(("/", "~", ".")) or name.endswith((".gguf", ".jsonl", ".json"))
            or name.count("/") > 1 or os.sep in name and Path(name).exists())


def model_label(name: object) -> str:
    """The default model's name for its embedded GGUF file, a hub id as it is, and the last
    component of any other local path."""
    text = str(name or "").strip()
    if not text:
        return "unknown model"
    if _is_path(text):
        parts = Path(text).parts
        if DEFAULT_GGUF_PACKAGE in parts or DEFAULT_GGUF_PACKAGE.replace("_", "-") in parts:
            return DEFAULT_MODEL_NAME
        return Path(text).name or text
    return text


def dataset_label(name: object) -> str:
    """'builtin', 'math500', a hub id as they are; a local file by its file name."""
    text = str(name or "").strip()
    return Path(text).name if text and _is_path(text) else text
