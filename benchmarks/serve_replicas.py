"""`powersmc serve --replicas K` against one process, on localhost: the same cores split into
replicas, and the routing cost of Ray Serve.

Usage: python benchmarks/serve_replicas.py [--cores 2] [--clients 1,8,32] [--requests 64]
       [--max-batch 32] [--rounds 2] [--pings 200] [--deadline 3600] [--out FILE.json]
       [-- extra `powersmc serve` flags]

Servers, started one at a time (an idle Ray cluster still costs CPU), each measured for
`--rounds` rounds of `benchmarks/serve_load.py`'s mixed workload (Power-SMC chat requests
with N 4 / 8 / 16, max_tokens 16-128, alpha 2 / 4, a third seeded) from C client threads
(answers/s, p50 / p95, errors, mean tokens):

  single   one process, --threads CORES           (no Ray)
  1xCORES  --replicas 1 --threads CORES           (Ray Serve, one model copy)
  KxT      --replicas CORES --threads 1           (Ray Serve, a copy per core)

Routing overhead: `--pings` sequential one-token requests (method plain, max_tokens 1) to
`single` and to `1xCORES`; the difference of their medians is what the ingress, Ray Serve's
proxy and router add to a request. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_load import closed_loop, free_port, launch, stop, wait_ready, workload

PING = {"max_tokens": 1, "method": "plain", "messages": [{"role": "user", "content": "Hi"}]}


def pings(url: str, n: int) -> dict:
    lat = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            start = time.perf_counter()
            r = client.post(f"{url}/v1/chat/completions", json=PING)
            if r.status_code == 200:
                lat.append(time.perf_counter() - start)
    lat.sort()
    return {"p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else float("nan"),
            "errors": n - len(lat)}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="the workload")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    ap.add_argument("--deadline", type=float, default=3600, help="whole run, seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    levels = [int(c) for c in args.clients.split(",")]
    cores = args.cores
    bodies = workload(args.requests, args.seed)
    common = ["--max-particles", "64", "--max-tokens-limit", "2048", *extra]
    servers = {"single": (["--threads", str(cores)], 1),
               f"1x{cores}": (["--replicas", "1", "--threads", str(cores)], 1),
               f"{cores}x1": (["--replicas", str(cores), "--threads", "1"], cores)}
    logs = Path(tempfile.mkdtemp(prefix="serve_replicas-"))
    started = time.monotonic()
    results: dict = {"load": {}, "pings": {}}
    for name, (flags, replicas) in servers.items():
        port = free_port()
        log = logs / f"{name}.log"
        proc = launch(port, ["--max-batch", str(args.max_batch), *common, *flags], log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, port, log, replicas)
            closed_loop(url, 1, bodies[:1], args.timeout)  # warm-up
            if name in ("single", f"1x{cores}"):
                results["pings"][name] = pings(url, args.pings)
            for c in levels:
                for _ in range(args.rounds):
                    if time.monotonic() - started > args.deadline:
                        raise SystemExit("--deadline reached")
                    results["load"].setdefault(c, {}).setdefault(name, []).append(
                        closed_loop(url, c, bodies, args.timeout))
        finally:
            stop(proc)
    print(f"mixed SMC workload (serve_load.py), {args.requests} requests per level, "
          f"{args.rounds} rounds (medians), {cores} cores")
    print("| clients | server | answers/s | p50 s | p95 s | errors | mean tokens |")
    print("|---|---|---|---|---|---|---|")
    for c, by in results["load"].items():
        for name, runs in by.items():
            agg = {k: statistics.median(r[k] for r in runs)
                   for k in ("answers_per_s", "p50_s", "p95_s", "mean_tokens")}
            print(f"| {c} | {name} | {agg['answers_per_s']:.3f} | {agg['p50_s']:.2f} | "
                  f"{agg['p95_s']:.2f} | {sum(r['errors'] for r in runs)} | "
                  f"{agg['mean_tokens']:.1f} |")
    p = results["pings"]
    print("\none-token request (plain, max_tokens 1), sequential:")
    for name, v in p.items():
        print(f"  {name}: p50 {v['p50_ms']:.1f} ms, p95 {v['p95_ms']:.1f} ms, "
              f"errors {v['errors']}")
    if len(p) == 2:
        over = p[f"1x{cores}"]["p50_ms"] - p["single"]["p50_ms"]
        results["routing_overhead_ms"] = over
        print(f"  routing overhead (median, Ray Serve - single process): {over:.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=1))


if __name__ == "__main__":
    main()
