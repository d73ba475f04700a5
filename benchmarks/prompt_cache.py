"""llama.cpp's prompt cache, on against off, for the methods whose moves are new requests.

Usage: python benchmarks/prompt_cache.py [--problems 8] [--methods mh,ecmh,ppt,smc-rm,smc]
       [--threads 2]

The first --problems of `builtin-long`, each method run as `powersmc eval --batch-prompts
--problems` runs it (all problems' programs started together on one `Scheduler`), with the
settings of the equal-compute run in docs/results/family-builtin-long (alpha 4, 48 tokens,
3 MH blocks, PPT stages of 16 tokens, the budget's knobs for N = 16), once with the prompt
cache on (the default) and once off (`LlamaCppLM.prompt_cache = False`: every freed stream
cleared), side by side in one process. Per method: wall seconds, tokens llama.cpp evaluated
(prompt chunks and steps), and whether every answer is the same token for token (it must
be: only prompt cells are shared). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from powersmc import Scheduler, load_model
from powersmc.eval.data import load_problems
from powersmc.methods.registry import method_program

SETTINGS = dict(alpha=4.0, max_new_tokens=48, num_blocks=3, stage_tokens=16)
KNOBS = {"mh": dict(mh_moves=14), "ecmh": dict(mh_moves=18), "ppt": dict(mh_moves=3),
         "smc-rm": dict(particles=10), "smc": dict(particles=16)}


def run(lm, method: str, prompts: list[str], cache: bool) -> dict:
    lm.prompt_cache, lm._ctx = cache, None  # a fresh context with the setting
    before = lm.tokens_decoded
    sched = Scheduler(lm)
    start = time.perf_counter()
    handles = [sched.start(method_program(method, lm, p, seed=k, **SETTINGS,
                                          **KNOBS.get(method, {})))
               for k, p in enumerate(prompts)]
    sched.run()
    seconds = time.perf_counter() - start
    sched.close()
    return {"seconds": seconds, "tokens_evaluated": lm.tokens_decoded - before,
            "answers": [h.result().token_ids for h in handles]}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--methods", default="mh,ecmh,ppt,smc-rm,smc")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    lm = load_model(backend="llama.cpp", threads=args.threads, chat=False)  # raw few-shot
    prompts = [p.question for p in load_problems("builtin-long", limit=args.problems)]
    out = {"problems": args.problems, "settings": SETTINGS, "knobs": KNOBS, "methods": {}}
    for method in args.methods.split(","):
        on, off = run(lm, method, prompts, True), run(lm, method, prompts, False)
        out["methods"][method] = {
            "seconds_on": round(on["seconds"], 2), "seconds_off": round(off["seconds"], 2),
            "speedup": round(off["seconds"] / on["seconds"], 2),
            "tokens_on": on["tokens_evaluated"], "tokens_off": off["tokens_evaluated"],
            "same_answers": on["answers"] == off["answers"]}
        print(method, out["methods"][method], file=sys.stderr)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
