"""A Transformers model directory with the default model's shape and tokenizer (chat template
included) but random weights: for timing the serving benchmarks on a machine the default GGUF
cannot reach (a lent GPU takes 64 MiB with the tree; nothing is downloaded there).

Random weights almost never draw EOS, so every answer runs to its `max_tokens`: a workload's
token counts are its limits, which a report must say.

Two steps:
    python benchmarks/random_model.py --skeleton runs/smollm2-random    # here: config, tokenizer
    python benchmarks/random_model.py --weights runs/smollm2-random     # there: + random weights
The first writes what travels (a few MB, from the default model's Transformers copy, made once
from the GGUF); the second adds `model.safetensors` from `from_config` (seed 0, bfloat16).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SKELETON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja")


def skeleton(out: Path) -> None:
    """The default model's configuration and tokenizer files, without its weights."""
    from powersmc.backends.convert import hf_directory
    from powersmc.models import default_gguf_path

    src = hf_directory(default_gguf_path())
    out.mkdir(parents=True, exist_ok=True)
    for name in SKELETON:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def weights(out: Path, dtype: str) -> None:
    """Random weights of the configuration in `out`, saved next to it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out),
                                             dtype=getattr(torch, dtype))
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--skeleton", type=Path, metavar="DIR")
    mode.add_argument("--weights", type=Path, metavar="DIR")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    if args.skeleton is not None:
        skeleton(args.skeleton)
    else:
        weights(args.weights, args.dtype)


if __name__ == "__main__":
    main()
