"""Power-SMC on vLLM against vLLM's own sampling, and per-answer time against other backends.

CPU (default model, converted once; the figures of docs/backends.md):
    python benchmarks/vllm_bench.py --particles 16 --tokens 256 --repeats 5 --out bench-vllm
  and, in a process of their own (vLLM sets a process's torch threads to 1, which would slow
  Transformers beside it), the other backends' seconds per answer on the same prompt:
    powersmc bench --backend llama.cpp,transformers --particles 16 --tokens 256 --out bench-out
GPU (Qwen2.5-7B's architecture with random weights, bf16; nothing downloaded):
    python benchmarks/vllm_bench.py --gpu --particles 64 --alpha 4 --tokens 1024,2048 \
        --repeats 3 --others transformers --out bench-vllm-gpu

Every run decodes exactly T tokens per sequence (EOS disabled). Writes bench_vllm.json and
bench_vllm.md to --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from powersmc import load_model
from powersmc.bench import compare_backends
from powersmc.bench.vllm_sampling import markdown, qwen_dummy_dir, smc_vs_vllm


def _gpu_models(others: list[str], kv_cache_gib: float):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from powersmc.backends.transformers_lm import TransformersLM
    from powersmc.backends.vllm_lm import VllmLM

    folder = qwen_dummy_dir(Path(tempfile.mkdtemp()) / "qwen2.5-7b-dummy")
    lm = VllmLM(folder, device="cuda", dtype="bfloat16", load_format="dummy", chat=False,
                kv_cache_gib=kv_cache_gib, max_model_len=4096, name="Qwen2.5-7B (dummy)")
    lms = {"vllm": lm}
    if "transformers" in others:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        lms["transformers"] = TransformersLM(model, AutoTokenizer.from_pretrained(folder),
                                             chat=False)
    return lms, list(range(1000, 1064))  # a 64-token prompt of ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="Qwen2.5-7B dummy weights on CUDA")
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--tokens", default="256", help="comma-separated lengths T")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--others", default="", help="with --gpu: 'transformers', timed beside "
                    "vLLM per answer")
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--out", default="bench-vllm")
    args = ap.parse_args()
    others = [o.strip() for o in args.others.split(",") if o.strip()]
    if others and (not args.gpu or others != ["transformers"]):
        ap.error("--others: only 'transformers', with --gpu (on CPU, time the other backends "
                 "in their own process: powersmc bench --backend llama.cpp,transformers)")
    if args.gpu:
        lms, prompt = _gpu_models(others, args.kv_cache_gib or 24.0)
    else:
        engine = {"kv_cache_gib": args.kv_cache_gib} if args.kv_cache_gib else None
        lms = {"vllm": load_model(backend="vllm", engine=engine)}
        prompt = "Explain why the sky is blue."  # powersmc bench's default prompt
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, text = [], []
    for tokens in (int(t) for t in args.tokens.split(",")):
        r = smc_vs_vllm(lms["vllm"], prompt, particles=args.particles, tokens=tokens,
                        alpha=args.alpha, repeats=args.repeats)
        if len(lms) > 1:
            r["backends"] = compare_backends(lms, prompt, particles=args.particles,
                                             tokens=tokens, alpha=args.alpha,
                                             repeats=args.repeats)
        results.append(r)
        text.append(markdown(r))
        for name, b in r.get("backends", {}).items():
            text.append(f"* {name}: {b['answer_seconds']['median']:.2f} s per answer, "
                        f"{b['step_ms']:.1f} ms per step, {b['speedup_of_first']:.2f}x vLLM's")
    (out / "bench_vllm.json").write_text(json.dumps(results, indent=2))
    (out / "bench_vllm.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
