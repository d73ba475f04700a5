"""Cache-safe reindexing of KV caches along the particle dimension (paper App. C).

Three tiers, tried in order: (i) a model-provided hook (`model._reorder_cache`), (ii) the
cache object's own method (`reorder_cache` / `batch_select_indices`), (iii) a recursive
reindexer over nested containers of tensors that assumes only that dimension 0 is the batch.

Copy-on-write fast path: resampling keeps the row count, and most ancestors are the row itself
(an SMC run with ESS >= N/2 keeps at least half of its rows). For caches that expose per-layer
`keys` / `values` tensors we then copy only the rows that change, in place, instead of
reallocating every layer.

`SlotCache`: the preallocated cache of the Transformers backend's static path, whose rows are
gathered in place and whose buffers keep their addresses (torch.compile / CUDA graphs).
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


class SlotCache:
    """A preallocated KV cache: per layer, keys and values of shape [R, H, L, D] (R rows,
    L slots), written in place; never concatenated, never reallocated while it fits.

    It is what the Transformers model sees as `past_key_values` on the static decode path
    (`TransformersLM(cache="static")`): the model calls `update(k, v, layer)` for each layer,
    which writes the new tokens' keys and values into their slots and returns the keys and
    values attention reads. Two modes:

    * eager (`full = False`): the new tokens go to slots `write .. write + q - 1` of the first
      `rows` rows, and attention reads views of the first `rows` rows and `write + q` slots:
      the work of the dynamic cache without its per-step copy of the whole cache;
    * fixed shape (`full = True`, for `torch.compile` / CUDA graphs): every row is written at
      slot `pos` (a one-element device tensor, so the compiled graph does not depend on the
      step) and attention reads all R x L slots; an attention mask hides the slots not
      written yet. The tensors keep their addresses for the life of the cache, which is what
      a captured CUDA graph needs.

    Rows are reindexed in place (`gather_`): resampling is a row gather within the same
    storage (paper App. C), with repeats and drops.
    """

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.rows = keys[0].shape[0]  # rows attention reads in eager mode
        self.write = 0  # eager mode: first slot the next update writes
        self.full = False
        self.pos = torch.zeros(1, dtype=torch.long, device=keys[0].device)

    @classmethod
    def allocate(cls, like: list[tuple[torch.Tensor, torch.Tensor]], rows: int,
                 slots: int, zeroed: bool = True) -> SlotCache:
        """Buffers for `rows` rows and `slots` slots, heads / head sizes / dtype / device
        taken from `like` (per layer (keys, values) [*, H, *, D]). Zeroed, unless the caller
        writes every slot a row will read before it reads it (`zeroed=False`): a masked slot
        gets weight exactly 0 in attention, but 0 * NaN would still be NaN."""
        make = torch.zeros if zeroed else torch.empty

        def buf(t: torch.Tensor) -> torch.Tensor:
            return make((rows, t.shape[1], slots, t.shape[3]), dtype=t.dtype, device=t.device)
        return cls([buf(k) for k, _ in like], [buf(v) for _, v in like])

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, slots) the buffers hold."""
        return self.keys[0].shape[0], self.keys[0].shape[2]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_sliding(self) -> list[bool]:
        """Per layer, as Transformers' caches: no sliding-window layer."""
        return [False] * len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.write

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.full:
            k.index_copy_(2, self.pos, key_states)
            v.index_copy_(2, self.pos, value_states)
            return k, v
        end = self.write + key_states.shape[2]
        k[: self.rows, :, self.write : end] = key_states
        v[: self.rows, :, self.write : end] = value_states
        return k[: self.rows, :, :end], v[: self.rows, :, :end]

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses (mutated in place inside a
        graph; without this, CUDA graphs are skipped for mutated inputs)."""
        for t in (*self.keys, *self.values, self.pos):
            torch._dynamo.mark_static_address(t)

    def gather_(self, index: torch.Tensor, used: int) -> None:
        """Rows 0 .. len(index) - 1 := old rows index[k], in place (len(index) <= R), in the
        first `used` slots (the slots past those written hold nothing a row reads).
        Only the rows that change are written; the source rows are read into a temporary
        first, so chains and swaps are safe. Rows beyond len(index) keep their contents."""
        rows = torch.arange(index.numel(), device=index.device)
        changed = (index != rows).nonzero().squeeze(1)
        if changed.numel() == 0:
            return
        src = index[changed]
        n = min(used, self.capacity[1])
        for t in (*self.keys, *self.values):
            t[changed, :, :n] = t[src, :, :n]

    def resized(self, index: torch.Tensor, slots: int, used: int) -> SlotCache:
        """A new cache whose row k is this cache's row index[k], with `slots` slots (the
        first min(slots, L, used) copied, the others zero): for growing past the buffers'
        rows or slots, and for forks."""
        n = min(slots, self.capacity[1], used)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((index.numel(), t.shape[1], slots, t.shape[3]), dtype=t.dtype,
                              device=t.device)
            out[:, :, :n] = t[:, :, :n].index_select(0, index)
            return out
        out = SlotCache([grow(t) for t in self.keys], [grow(t) for t in self.values])
        out.write = min(self.write, slots)
        return out

    def load_(self, layers: list[tuple[torch.Tensor, torch.Tensor]], repeat: int,
              row: int = 0, slot: int = 0) -> None:
        """Copy a prefill's per-layer (keys, values) [P, H, S, D] into rows row .. row +
        P * repeat - 1 and slots slot .. slot + S - 1, each prompt repeated for `repeat`
        consecutive rows (prompt-major, as `prefill_many`); those rows' slots before `slot`
        (padding their attention reads, masked) are zeroed."""
        for (k, v), kb, vb in zip(layers, self.keys, self.values, strict=True):
            s, n = k.shape[2], k.shape[0] * repeat
            for src, dst in ((k, kb), (v, vb)):
                dst[row : row + n, :, :slot] = 0
                dst[row : row + n, :, slot : slot + s] = src.repeat_interleave(repeat, 0)
