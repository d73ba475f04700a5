"""Where a prompt's tokens go in llama.cpp's decodes (`LlamaCppLM._prompts`): the bounds of
the decodes that evaluate it (`chunk_bounds`) and the longest prefix another row already
holds (`shared_prefix`)."""

from __future__ import annotations

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


def shared_prefix(known: dict[tuple[int, ...], int], prompt: tuple[int, ...]) -> tuple[int, int]:
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
