"""The toy evaluation (`ray_toys`) on 2 workers of the Ray cluster at argv[2], written to
argv[1]; the kill-the-driver test runs it as a subprocess."""

import sys

from ray_toys import KW, SPEC, problems

from powersmc.eval.runner import run_eval

if __name__ == "__main__":
    run_eval(SPEC, problems(), out_dir=sys.argv[1], workers=2, ray_address=sys.argv[2], **KW)
