#!/usr/bin/env bash
# serve_load.py (issue 20's load benchmark) on a lent GPU, as one prepared command: Transformers
# backend, the default model's shape and tokenizer with random weights (random_model.py: every
# answer runs to its max_tokens). Prepared here, before the run (both are ignored paths):
#   PYTHONPATH=src python benchmarks/random_model.py --skeleton runs/smollm2-random
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn
# then, with the device tool: carry [".whl", "runs/smollm2-random"], command
#   bash benchmarks/gpu_serve_load.sh [serve_load.py flags]      (default: 8 and 32 clients)
# Both servers step eagerly (COMPILE=off, the default here): a continuous batch turns eager at
# its first admission anyway, and compiling a 30-layer model for each new batch shape would
# spend the run's minutes on compilation. COMPILE=auto measures with it.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
python3 benchmarks/random_model.py --weights runs/smollm2-random
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cd benchmarks
python3 serve_load.py --clients 8,32 --requests 48 --rate 4 --max-batch 32 --deadline 420 \
    --out "${OUT:-..}/serve_load.json" "$@" \
    -- --model ../runs/smollm2-random --backend transformers --device cuda --dtype bfloat16 \
    --compile "${COMPILE:-off}"
