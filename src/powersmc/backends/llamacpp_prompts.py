"""Where a prompt's tokens go in llama.cpp's decodes (`LlamaCppLM._prompts`): the bounds of
the decodes that evaluate it (`chunk_bounds`), the longest prefix another row already holds
(`shared_prefix`) and which free sequence each joining prompt takes (`placement`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PROMPT_CHUNK = 32  # most tokens of a prompt per decode (`chunk_bounds`: why)


def chunk_bounds(shared: int, size: int) -> list[int]:
    """The bounds of the decodes that evaluate a prompt of `size` tokens whose first `shared`
    are copied from another row: chunks of at most PROMPT_CHUNK tokens at fixed positions
    (multiples of PROMPT_CHUNK), the first starting at `shared`, or one earlier so that no
    decode of a shared prompt holds a single token. Why: llama.cpp's kernels for a decode
    of one sequence change with its token count (one token; 64 and more), and so do the
    bits of their results; a decode of 2 to PROMPT_CHUNK tokens gives each token the same
    bits whatever else it holds (measured). So a prompt's cells and logits do not depend on
    how much of it was shared, i.e. on what else is in the batch (tested)."""
    start = max(min(shared, size - 2), 0)
    if start and -start % PROMPT_CHUNK == 1:
        start -= 1
    inner = range(-(-(start + 1) // PROMPT_CHUNK) * PROMPT_CHUNK, size, PROMPT_CHUNK)
    return [start, *inner, size]


def shared_prefix(known: Iterable[tuple[tuple[int, ...], int]],
                  prompt: tuple[int, ...]) -> tuple[int, int]:
    """The longest prefix of `prompt`, all but its last token, that a known (prompt,
    sequence) holds: (its length, that sequence); (0, -1) if none."""
    best, src = 0, -1
    for head, seq in known:
        n = min(len(head), len(prompt) - 1)
        if n <= best:
            continue
        a, b = np.asarray(head[:n]), np.asarray(prompt[:n])
        diff = np.flatnonzero(a != b)
        k = int(diff[0]) if diff.size else n
        if k > best:
            best, src = k, seq
    return best, src


def placement(near: np.ndarray, prompts: list[tuple[int, ...]], rows: int,
              cached: dict[int, tuple[int, ...]]) -> np.ndarray:
    """The sequence ids, in row order, for `rows` rows of each prompt, taken from the free
    ids `near` (in their order): each prompt's first row takes the id of `near` whose cached
    prompt shares the longest prefix with it (the prompt then continues those cells where
    they are), other rows the next ids left."""
    left = [int(i) for i in near]
    out: list[int] = []
    for prompt in prompts:
        own = [(cached[i], i) for i in left if i in cached]
        shared, seq = shared_prefix(own, prompt)
        first = seq if shared > 0 else left[0]
        left.remove(first)
        out += [first, *left[: rows - 1]]
        del left[: rows - 1]
    return np.array(out, dtype=np.int64)
