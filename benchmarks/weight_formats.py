"""llama.cpp weight formats on this machine: numerics against Transformers float32, and the
cost of a step at 1, 16 and 64 rows (issue 30).

Usage: python benchmarks/weight_formats.py [--formats file,f16,bf16,q8_0] [--threads 2]
       [--no-timing] [--repeats 5]

Numerics: the teacher-forced text of tests/test_llamacpp_backend.py (239 positions); per
format, against Transformers on the same GGUF de-quantised to float32: TV of the next-token
distributions (mean and max), max |delta log p| over Transformers' top 10, argmax agreement.
Timing (an idle machine): one prompt, `rows` rows stepped `--repeats` x 8 times; the median ms
per step. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from powersmc import load_model

TEXT = ("The water cycle describes how water moves on Earth. Water evaporates from oceans "
        "and lakes, rises as vapour, cools and condenses into clouds, and falls back as rain "
        "or snow. Rivers carry it to the sea, plants return some to the air, and the cycle "
        "repeats. It shapes weather, climate and the landscape over many thousands of years, "
        "and every living thing depends on it for fresh water. ") * 3


def numerics(lm, hf_lm) -> dict:
    ids = hf_lm.tokenizer(TEXT)["input_ids"][:240]
    with torch.inference_mode():
        hf = torch.log_softmax(hf_lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    state, first = lm.prefill(ids[:1], 1, budget=len(ids))
    rows = [first[0]]
    for t in ids[1:-1]:
        rows.append(lm.step(state, torch.tensor([t]))[0])
    ll = torch.stack(rows)
    hf = hf[: ll.shape[0]]
    tv = 0.5 * (ll.exp() - hf.exp()).abs().sum(-1)
    top = hf.topk(10, -1).indices
    dlog = (ll.gather(1, top) - hf.gather(1, top)).abs()
    return {"positions": int(ll.shape[0]), "tv_mean": float(tv.mean()), "tv_max": float(tv.max()),
            "max_dlogp_top10": float(dlog.max()),
            "argmax_agreement": float((ll.argmax(-1) == hf.argmax(-1)).double().mean())}


def step_ms(lm, rows: int, repeats: int) -> float:
    prompt = lm.encode_prompt("Explain why the sky is blue.")
    times = []
    for _ in range(repeats):
        state, _ = lm.prefill(prompt, rows, budget=rows * 16 + 64)
        tok = torch.full((rows,), 11, dtype=torch.long)
        lm.step(state, tok)  # warm
        start = time.perf_counter()
        for _ in range(8):
            lm.step(state, tok)
        times.append((time.perf_counter() - start) / 8 * 1000)
        del state
    return statistics.median(times)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="file,f16,bf16,q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    hf_lm = load_model(backend="transformers", dtype="float32", threads=args.threads)
    out = {}
    for fmt in args.formats.split(","):
        lm = load_model(backend="llama.cpp", weights=fmt, threads=args.threads)
        row = {"numerics": numerics(lm, hf_lm)}
        if not args.no_timing:
            row["ms_per_step"] = {r: round(step_ms(lm, r, args.repeats), 2) for r in (1, 16, 64)}
        out[fmt] = row
        print(fmt, json.dumps(row), file=sys.stderr)
        del lm
    print(json.dumps({"threads": args.threads, "formats": out}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
