"""The Transformers backend's two KV-cache paths timed side by side (issue 23): single-sequence
decoding, batched sampling of N sequences and Power-SMC, each on the static cache (compiled
into CUDA graphs on a GPU) and on the dynamic cache; s(b); where an SMC step's time goes.

GPU (one command, from the source tree; nothing downloaded, no vLLM or llama.cpp needed):
    PYTHONPATH=src python benchmarks/gpu_bench.py --out bench-gpu            # T = 1024
    PYTHONPATH=src python benchmarks/gpu_bench.py --long --out bench-gpu     # and T = 2048
  Qwen2.5-7B's architecture (benchmarks/configs/qwen2.5-7b.json) with random bf16 weights,
  a 64-token prompt of ids, alpha = 4, N = 64. Targets: SMC <= 1.25x single-sequence decoding
  (the paper on Transformers: 1.44-1.64x) and SMC <= 1.05x batched sampling of 64 sequences.
CPU, default model (SmolLM2-135M), static against dynamic per SMC step:
    PYTHONPATH=src python benchmarks/gpu_bench.py --model default --particles 16 \
        --tokens 256 --repeats 3 --out bench-cpu-cache
CI smoke test (CPU, tiny configuration, seconds): --tiny.

Every run decodes exactly T tokens per sequence (EOS disabled, `bench.NoEOS`), so both paths do
the same work. A compiled shape is compiled / captured by a warm-up before it is timed. The
parts run in order of importance and the ones after `--budget-s` seconds are skipped (listed
in the results), so the run fits its time slot. Writes gpu_bench.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from powersmc.backends.transformers_lm import TransformersLM
from powersmc.bench import NoEOS, _timed, profile_smc
from powersmc.runtime.api import sample, smc_sample

CONFIGS = Path(__file__).resolve().parent / "configs"
CACHES = ("static", "dynamic")


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over t0 .. t{vocab-1} (prompts are ids; only `decode` uses it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", unk_token="t0")


def random_models(config_file: Path, device: torch.device, dtype: torch.dtype,
                  compile_opt: Any) -> dict[str, TransformersLM]:
    """One random-weight model per cache path (the same weights: a copy), so the dynamic path
    keeps Transformers' own attention function."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_file.read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tok = word_tokenizer(config.vocab_size)
    other = copy.deepcopy(model)
    return {"static": TransformersLM(model, tok, chat=False, cache="static",
                                     compile=compile_opt),
            "dynamic": TransformersLM(other, tok, chat=False, cache="dynamic")}


def default_models(compile_opt: Any) -> dict[str, TransformersLM]:
    from powersmc.models import load_model

    return {"static": _with_compile(load_model(backend="transformers", cache="static"),
                                    compile_opt),
            "dynamic": load_model(backend="transformers", cache="dynamic")}


def _with_compile(lm: TransformersLM, compile_opt: Any) -> TransformersLM:
    return TransformersLM(lm.model, lm.tokenizer, chat=lm.chat, cache="static",
                          compile=compile_opt)


def warm(lm: TransformersLM, ids: list[int], rows: int, tokens: int) -> float:
    """Compile / capture the step of the shape a run of `rows` rows and T tokens uses (the
    same budget, hence the same buffers); seconds taken. Eager paths: a few steps."""
    start = time.perf_counter()
    state, logp = lm.prefill(ids, rows, budget=rows * tokens)
    tok = logp.argmax(-1)
    for _ in range(3):
        lm.step(state, tok)
    del state
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(lm: TransformersLM, ids: list[int], batches: list[int], tokens: int,
               deadline: float, steps: int = 8) -> dict[int, float]:
    """s(b) = b * t(1) / t(b) from the time of one decode step at batch b (`steps` steps
    after one untimed step), each b prefilled with the budget of a T-token run (so b = 1 and
    b = N reuse the runs' compiled shapes). Stops at `deadline` (perf_counter seconds) with
    the batches done; b = 1 always comes first."""
    per_step: dict[int, float] = {}
    for b in sorted(set(batches), key=lambda b: (b != 1, b)):
        if per_step and time.perf_counter() > deadline:
            break
        state, logp = lm.prefill(ids, b, budget=b * tokens)
        tok = logp.argmax(-1)
        lm.step(state, tok)
        t, _ = _timed(lm.device, lambda s=state, k=tok: [lm.step(s, k) for _ in range(steps)])
        per_step[b] = t / steps
        del state
    return {b: b * per_step[1] / per_step[b] for b in sorted(per_step)}


def decode_runs(lms: dict[str, TransformersLM], ids: list[int], *, particles: int,
                tokens: int, alpha: float, repeats: int) -> dict[str, Any]:
    """Seconds of single-sequence decoding, batched sampling of N sequences (temperature
    1/alpha) and Power-SMC, T forced tokens each, per cache path; rounds alternate the paths;
    medians and the ratios SMC / single and SMC / batched."""
    out: dict[str, Any] = {}
    for name, lm in lms.items():
        out[name] = {"warmup_seconds": warm(lm, ids, 1, tokens) + warm(lm, ids, particles,
                                                                        tokens)}
        for k in ("single", "batched", "smc"):
            out[name][k] = []
        out[name]["resamples"] = []
    for _ in range(repeats):
        for name, lm in lms.items():
            f, dev, r = NoEOS(lm), lm.device, out[name]
            r["single"].append(_timed(dev, sample, f, ids, temperature=1.0,
                                      max_new_tokens=tokens, seed=0)[0])
            r["batched"].append(_timed(dev, sample, f, ids, temperature=1 / alpha,
                                       num_samples=particles, max_new_tokens=tokens,
                                       seed=0)[0])
            t, res = _timed(dev, smc_sample, f, ids, alpha=alpha, particles=particles,
                            max_new_tokens=tokens, seed=0)
            r["smc"].append(t)
            r["resamples"].append(len(res.resample_steps))
    for r in out.values():
        for k in ("single", "batched", "smc"):
            r[k] = statistics.median(r[k])
        r["smc_step_ms"] = 1e3 * r["smc"] / tokens
        r["smc_over_single"] = r["smc"] / r["single"]
        r["smc_over_batched"] = r["smc"] / r["batched"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny config, seconds")
    ap.add_argument("--model", default="qwen2.5-7b",
                    help="qwen2.5-7b (random weights), default (embedded SmolLM2, CPU) or a "
                         "config JSON file")
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--long", action="store_true", help="also T = 2048")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batches", default="1-64", help="s(b) on the dynamic path: 'lo-hi' or a list")
    ap.add_argument("--static-batches", default="1,2,4,8,16,32,64",
                    help="s(b) on the static path (each new shape is compiled / captured)")
    ap.add_argument("--compile", default="auto",
                    help="static path: auto (CUDA graphs on a GPU, eager on CPU), on, off")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining optional parts after this many seconds")
    ap.add_argument("--out", default="bench-gpu")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    compile_opt = {"auto": None, "on": True, "off": False}[args.compile]
    if args.tiny:
        args.particles, args.tokens, args.prompt_len = min(args.particles, 4), 8, 8
        args.batches, args.static_batches, args.long = "1,4", "1,4", False
        lms = random_models(CONFIGS / "tiny-qwen2.json", dev, torch.float32, compile_opt)
    elif args.model == "default":
        lms = default_models(compile_opt)
        dev = lms["static"].device
    else:
        path = Path(args.model)
        path = path if path.suffix == ".json" else CONFIGS / f"{args.model}.json"
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        lms = random_models(path, dev, dtype, compile_opt)
    if args.model == "default" and not args.tiny:
        ids = lms["static"].encode_prompt("Explain why the sky is blue.")
    else:
        ids = [1000 % lms["static"].vocab_size + i for i in range(args.prompt_len)]
    info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": _version("transformers"),
            "threads": torch.get_num_threads(), "model": "tiny" if args.tiny else args.model,
            "particles": args.particles, "alpha": args.alpha, "prompt_tokens": len(ids),
            "repeats": args.repeats,
            "compiled": lms["static"].compile_options is not None,
            "setup_seconds": time.perf_counter() - t0}
    result: dict[str, Any] = {"info": info, "runs": {}, "skipped": [], "errors": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def part(name: str, fn, optional: bool = True) -> Any:
        if optional and time.perf_counter() - t0 > args.budget_s:
            result["skipped"].append(name)
            return None
        print(f"[{time.perf_counter() - t0:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - record it and go on with the other parts
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"  failed: {result['errors'][name]}", file=sys.stderr)
            return None
        finally:
            (out / "gpu_bench.json").write_text(json.dumps(result, indent=2))

    lengths = [args.tokens] + ([2048] if args.long else [])
    kw = dict(particles=args.particles, alpha=args.alpha, repeats=args.repeats)
    result["runs"][str(lengths[0])] = part(f"T={lengths[0]}", lambda: decode_runs(
        lms, ids, tokens=lengths[0], **kw), optional=False)
    for name, lm in lms.items():
        result.setdefault("profile", {})[name] = part(
            f"profile {name}", lambda lm=lm: profile_smc(lm, ids, particles=args.particles,
                                                         tokens=lengths[0], alpha=args.alpha))
    for name, spec in (("static", args.static_batches), ("dynamic", args.batches)):
        bs = _batches(spec)
        result.setdefault("s", {})[name] = part(
            f"s(b) {name}", lambda n=name, bs=bs: throughput(lms[n], ids, bs, lengths[0],
                                                            t0 + args.budget_s))
    for t in lengths[1:]:
        result["runs"][str(t)] = part(f"T={t}", lambda t=t: decode_runs(lms, ids, tokens=t,
                                                                         **kw))
    result["info"]["compile_error"] = lms["static"].compile_error
    result["info"]["total_seconds"] = time.perf_counter() - t0
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    return 0 if not result["errors"] else 1


def _batches(spec: str) -> list[int]:
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in spec.split(",")]


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def report(r: dict[str, Any]) -> str:
    """The ratios, per T and cache path, as Markdown."""
    i = r["info"]
    compiled = i["compiled"] and not i.get("compile_error")
    lines = [f"## gpu_bench: {i['device']}, {i['model']}, N = {i['particles']}, "
             f"alpha = {i['alpha']}, compiled static path: {compiled}", "",
             "| T | cache | single s | batched s | SMC s | ms / SMC step | SMC / single | "
             "SMC / batched |", "|---|---|---|---|---|---|---|---|"]
    for t, runs in r["runs"].items():
        for name, v in (runs or {}).items():
            lines.append(f"| {t} | {name} | {v['single']:.2f} | {v['batched']:.2f} | "
                         f"{v['smc']:.2f} | {v['smc_step_ms']:.2f} | "
                         f"{v['smc_over_single']:.3f} | {v['smc_over_batched']:.3f} |")
    for name, p in (r.get("profile") or {}).items():
        if p:
            lines.append(f"* profile {name}: " + ", ".join(
                f"{k} {v:.2f} s" for k, v in p.items()))
    for name, s in (r.get("s") or {}).items():
        if s:
            lines.append(f"* s(b) {name}: " + ", ".join(f"{b}: {v:.2f}" for b, v in s.items()))
    if i.get("compile_error"):
        lines.append(f"* compilation given up (static path ran eagerly): {i['compile_error']}")
    if r["skipped"]:
        lines.append(f"* skipped (time budget): {', '.join(r['skipped'])}")
    for k, v in r["errors"].items():
        lines.append(f"* error in {k}: {v}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
