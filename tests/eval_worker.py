"""A slow character-level toy LM evaluated by run_eval; used by the kill-and-resume test."""

import math
import random
import sys
import time

from powersmc import FunctionLM
from powersmc.eval.data import Problem
from powersmc.eval.runner import run_eval

VOCAB = 11  # digits 0-9, EOS = 10


class DigitLM(FunctionLM):
    def encode_prompt(self, prompt):
        return [ord(c) % 10 for c in prompt] if isinstance(prompt, str) else list(prompt)

    def decode(self, ids):
        return "".join(str(i) for i in ids if i != 10)


def _next(prefix):
    time.sleep(0.004)
    rng = random.Random(hash(prefix[-6:]))
    return [math.log(rng.random() + 0.05) for _ in range(VOCAB)]


def main(out_dir, batch_prompts=1):
    lm = DigitLM(_next, VOCAB, [10])
    problems = [Problem(f"p{i}", f"{i}+{i}", str(2 * i), "number") for i in range(6)]
    run_eval(lm, problems, methods=["plain", "lowtemp", "smc"], seeds=[0, 1], out_dir=out_dir,
             template="{problem}", alpha=4.0, max_new_tokens=6, options={"particles": 4},
             progress=False, batch_prompts=batch_prompts)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
