"""Where joining prompts go in a llama.cpp context (`backends.llamacpp_prompts`), by hand."""

import numpy as np

from powersmc.backends.llamacpp_prompts import placement, shared_prefix


def test_shared_prefix_takes_the_longest_and_never_the_last_token():
    known = [((1, 2, 3), 7), ((1, 2, 9, 9), 8)]
    assert shared_prefix(known, (1, 2, 9, 9)) == (3, 8)  # all but the last token
    assert shared_prefix(known, (1, 2, 3, 4)) == (3, 7)
    assert shared_prefix(known, (5, 6)) == (0, -1)


def test_each_prompt_takes_the_free_stream_whose_cached_prompt_it_continues():
    cached = {4: (1, 2, 3, 4), 6: (1, 5, 5, 5), 9: (8, 8)}
    near = np.array([4, 6, 10, 11, 12])
    # the second prompt continues stream 4's, the first stream 6's; the third none: next left
    order = placement(near, [(1, 5, 5, 7), (1, 2, 3, 9), (7, 7)], 1, cached)
    assert order.tolist() == [6, 4, 10]
    # rows beyond a prompt's first take the next ids left, in order
    order = placement(near, [(1, 2, 3, 4, 0), (6, 6)], 2, cached)
    assert order.tolist() == [4, 6, 10, 11]
