"""Load test of `powersmc serve`: batched serving against one-request-at-a-time serving, side by
side, on localhost only.

Usage: python benchmarks/serve_load.py [--clients 1,8,32] [--requests 64] [--particles 8]
       [--tokens 64] [--max-batch 32] [--rounds 2] [--deadline 1800] [--out FILE.json]
       [-- extra `powersmc serve` flags, e.g. --backend llama.cpp --threads 2]

Two servers on the same model and flags are started on free localhost ports: one with
`--max-batch B` (concurrent compatible SMC requests share `smc_sample_many` batches), one with
`--max-batch 1` (each request runs alone). For each number of concurrent clients C, the same
fixed list of SMC chat requests (N particles, max_tokens T, unseeded) is sent by C client threads,
to one server and then the other, alternating for `--rounds` rounds. Printed per C and server:
answers per second, p50 / p95 latency, errors (must be 0), mean completion tokens, and the
throughput gain batched / one-at-a-time. Answers end at EOS or T tokens, so lengths vary; both
servers get the same prompts. Each server answers one untimed warm-up request first. Bounded:
every request has a timeout, the whole run a deadline. Run it on an otherwise idle machine:
on shared cores, oversubscribed torch threads make single steps take seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

LOGS: dict[int, Path] = {}
PROMPTS = ["What is 12 * 7?", "Explain why the sky is blue.", "Name three prime numbers.",
           "Write one sentence about the sea.", "What is the capital of Italy?",
           "How many legs does a spider have?", "Give a synonym for 'happy'.",
           "What is 15 + 27?"]


def launch(port: int, max_batch: int, extra: list[str], log: Path) -> subprocess.Popen:
    """Start `powersmc serve` on 127.0.0.1:port, output to `log` (returns at once)."""
    cmd = [sys.executable, "-m", "powersmc", "serve", "--host", "127.0.0.1", "--port",
           str(port), "--max-batch", str(max_batch), "--max-queue", "256",
           "--log-level", "warning", *extra]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"HF_HUB_OFFLINE": "1"})


def wait_up(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Return once the server's /health answers; exit if it died or took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode} "
                             f"(its output: {LOGS.get(port)})")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not start within {timeout:.0f}s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(client: httpx.Client, url: str, body: dict) -> tuple[float, bool, int]:
    """(latency seconds, ok, completion tokens) of one request."""
    start = time.perf_counter()
    try:
        r = client.post(f"{url}/v1/chat/completions", json=body)
        ok = r.status_code == 200
        tokens = r.json()["usage"]["completion_tokens"] if ok else 0
    except httpx.HTTPError:
        ok, tokens = False, 0
    return time.perf_counter() - start, ok, tokens


def load(url: str, clients: int, requests: int, body: dict, timeout: float) -> dict:
    """Send `requests` requests from `clients` threads; throughput and latency figures."""
    bodies = [body | {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
              for i in range(requests)]
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(lambda b: one(client, url, b), bodies))
        wall = time.perf_counter() - start
    lat = sorted(x[0] for x in out if x[1])
    ok = len(lat)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"answers_per_s": ok / wall, "p50_s": pct(0.5), "p95_s": pct(0.95),
            "errors": requests - ok, "wall_s": wall,
            "mean_tokens": statistics.mean(x[2] for x in out if x[1]) if ok else 0.0}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per level and server")
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternations per level")
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    ap.add_argument("--deadline", type=float, default=1800, help="whole run, seconds")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    levels = [int(c) for c in args.clients.split(",")]
    if min(levels) < 1 or args.requests < 1 or args.rounds < 1:
        ap.error("--clients, --requests and --rounds must be >= 1")
    body = {"max_tokens": args.tokens, "particles": args.particles, "alpha": args.alpha,
            "method": "smc"}
    serve_extra = ["--max-particles", str(max(64, args.particles)),
                   "--max-tokens-limit", str(max(2048, args.tokens)), *extra]
    started = time.monotonic()
    ports = {"batched": free_port(), "one-at-a-time": free_port()}
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))
    LOGS.update({p: logs / f"serve-{p}.log" for p in ports.values()})
    procs = {"batched": launch(ports["batched"], args.max_batch, serve_extra,
                               LOGS[ports["batched"]]),
             "one-at-a-time": launch(ports["one-at-a-time"], 1, serve_extra,
                                     LOGS[ports["one-at-a-time"]])}
    results: dict[int, dict[str, list[dict]]] = {}
    try:
        for name, proc in procs.items():
            wait_up(proc, ports[name], 300)
            load(f"http://127.0.0.1:{ports[name]}", 1, 1, body, args.timeout)  # warm-up
        for c in levels:
            results[c] = {"batched": [], "one-at-a-time": []}
            for r in range(args.rounds):
                order = ["one-at-a-time", "batched"] if r % 2 == 0 else ["batched",
                                                                          "one-at-a-time"]
                for name in order:
                    if time.monotonic() - started > args.deadline:
                        raise TimeoutError("--deadline reached")
                    url = f"http://127.0.0.1:{ports[name]}"
                    results[c][name].append(load(url, c, args.requests, body, args.timeout))
    except TimeoutError as exc:
        print(f"stopped early: {exc}", file=sys.stderr)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    report(results, args)


def report(results: dict[int, dict[str, list[dict]]], args: argparse.Namespace) -> None:
    print(f"SMC N={args.particles} T={args.tokens} alpha={args.alpha}, {args.requests} "
          f"requests per level and server, {args.rounds} rounds, batched --max-batch "
          f"{args.max_batch}")
    print("| clients | server | answers/s | p50 s | p95 s | errors | mean tokens |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for c, by_server in results.items():
        row = {}
        for name, runs in by_server.items():
            if not runs:
                continue
            agg = {k: statistics.median(r[k] for r in runs) for k in
                   ("answers_per_s", "p50_s", "p95_s", "mean_tokens")}
            agg["errors"] = sum(r["errors"] for r in runs)
            row[name] = agg
            print(f"| {c} | {name} | {agg['answers_per_s']:.3f} | {agg['p50_s']:.2f} | "
                  f"{agg['p95_s']:.2f} | {agg['errors']} | {agg['mean_tokens']:.1f} |")
        if len(row) == 2:
            row["gain"] = row["batched"]["answers_per_s"] / row["one-at-a-time"]["answers_per_s"]
            print(f"| {c} | gain batched / one-at-a-time | {row['gain']:.2f}x | | | | |")
        summary[c] = row | {"runs": by_server}
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "levels": summary}, indent=1))
    errors = sum(r["errors"] for runs in results.values() for rs in runs.values() for r in rs)
    if errors:
        raise SystemExit(f"{errors} request(s) failed: a loaded server must answer every one")


if __name__ == "__main__":
    main()
