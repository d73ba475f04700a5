"""Cache-safe reindexing of KV caches along the particle dimension (paper App. C).

Three tiers, tried in order: (i) a model-provided hook (`model._reorder_cache`), (ii) the
cache object's own method (`reorder_cache` / `batch_select_indices`), (iii) a recursive
reindexer over nested containers of tensors that assumes only that dimension 0 is the batch.

Copy-on-write fast path: resampling keeps the row count, and most ancestors are the row itself
(an SMC run with ESS >= N/2 keeps at least half of its rows). For caches that expose per-layer
`keys` / `values` tensors we then copy only the rows that change, in place, instead of
reallocating every layer.
"""

from __future__ import annotations

from typing import Any

import torch


def _layers(cache: Any) -> list[Any] | None:
    layers = getattr(cache, "layers", None)
    if not layers or not all(
        isinstance(getattr(la, "keys", None), torch.Tensor)
        and isinstance(getattr(la, "values", None), torch.Tensor)
        for la in layers
    ):
        return None
    return list(layers)


def copy_changed_rows(cache: Any, index: torch.Tensor) -> bool:
    """Row k := row index[k] for the rows where index[k] != k, in place. False if unsupported.

    The right-hand side gathers the source rows into a temporary before any row is written,
    so chains and swaps among the changed rows are safe.
    """
    layers = _layers(cache)
    if layers is None or layers[0].keys.shape[0] != index.numel():
        return False
    rows = torch.arange(index.numel(), device=index.device)
    changed = (index != rows).nonzero().squeeze(1)
    if changed.numel() == 0:
        return True
    src = index[changed]
    for layer in layers:
        dev = layer.keys.device
        dst, s = changed.to(dev), src.to(dev)
        layer.keys[dst] = layer.keys[s]
        layer.values[dst] = layer.values[s]
    return True


def reindex_nested(obj: Any, index: torch.Tensor) -> Any:
    """Tier (iii): reindex every tensor in a nested tuple / list / dict along dimension 0."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device))
    if isinstance(obj, (list, tuple)):
        out = [reindex_nested(o, index) for o in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, dict):
        return {k: reindex_nested(v, index) for k, v in obj.items()}
    return obj


def reorder_cache(model: Any, cache: Any, index: torch.Tensor) -> Any:
    """Return the cache with row k taken from old row index[k] (repeats and shrinking allowed)."""
    if copy_changed_rows(cache, index):
        return cache
    hook = getattr(model, "_reorder_cache", None)
    if callable(hook):
        try:
            return hook(cache, index)
        except NotImplementedError:
            pass
    for name in ("reorder_cache", "batch_select_indices"):
        method = getattr(cache, name, None)
        if callable(method):
            method(index)
            return cache
    return reindex_nested(cache, index)
