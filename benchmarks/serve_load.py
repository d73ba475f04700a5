"""Load test of `powersmc serve` on a mixed Power-SMC workload: the scheduler's continuous
batching against one request at a time and against the same requests run offline through one
`Scheduler`, side by side, on localhost only.

Usage: python benchmarks/serve_load.py [--clients 1,8,32] [--requests 48] [--rate 0.5]
       [--max-batch 32] [--threads 2] [--rounds 1] [--deadline 3600] [--out FILE.json]
       [-- extra `powersmc serve` flags]

The workload (fixed by `--seed`): chat requests with N in {4, 8, 16} particles, max_tokens in
{16, 32, 64, 128}, alpha in {2, 4}, a third of them seeded; every server and the offline run
get the same list. Two servers on the same model and flags (`--threads`) run at once on free
ports: `continuous` with `--max-batch B`, and `serial` with `--max-batch 1` (one request's
system in the batch at a time: the requests run one after another, as a server without
batching would). For each C in `--clients`, C client threads send the list
(closed loop); then an open loop sends it at Poisson arrivals of `--rate` requests/s (the same
arrival times for both). Offline: the same requests submitted at once to one in-process
`Scheduler(max_systems=B)` on the same model, after the servers stopped (the ceiling a server
can reach). Printed per level and server: answers/s, queue time and end-to-end latency
p50 / p95 (queue time is the server's own `queue_seconds`), errors (must be 0), and the
ratios the issue asks about. Bounded: every request has a timeout, the whole run a deadline.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = ["What is 12 * 7?", "Explain why the sky is blue.", "Name three prime numbers.",
           "Write one sentence about the sea.", "What is the capital of Italy?",
           "How many legs does a spider have?", "Give a synonym for 'happy'.",
           "What is 15 + 27?"]


def workload(requests: int, seed: int = 0) -> list[dict]:
    """The mixed Power-SMC chat requests (deterministic for a seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "method": "smc", "particles": rng.choice([4, 8, 16]),
                "max_tokens": rng.choice([16, 32, 64, 128]), "alpha": rng.choice([2.0, 4.0])}
        if i % 3 == 0:
            body["seed"] = rng.randrange(2**31)
        out.append(body)
    return out


def launch(port: int, flags: list[str], log: Path) -> subprocess.Popen:
    """Start `powersmc serve` on 127.0.0.1:port in its own session, output to `log` (returns
    at once; see `stop`)."""
    cmd = [sys.executable, "-m", "powersmc", "serve", "--host", "127.0.0.1", "--port",
           str(port), "--max-queue", "256", "--log-level", "warning", *flags]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"HF_HUB_OFFLINE": "1"},
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, replicas: int = 0,
               timeout: float = 600) -> None:
    """Return once the server's /health is 200 (a replicated one's: with `replicas` ready);
    exit if it died or took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode} "
                             f"(its output: {log})")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if r.status_code == 200 and r.json().get("ready_replicas", 1) >= replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not start within {timeout:.0f} s "
                     f"(its output: {log})")


def stop(*procs: subprocess.Popen) -> None:
    """SIGTERM each server, then SIGKILL its whole session (a replicated server's Ray
    cluster leaves helper processes behind)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(client: httpx.Client, url: str, body: dict) -> dict:
    """Latency, outcome, completion tokens and the server's queue time of one request."""
    start = time.perf_counter()
    try:
        r = client.post(f"{url}/v1/chat/completions", json=body)
        ok = r.status_code == 200
        out = r.json() if ok else {}
    except httpx.HTTPError:
        ok, out = False, {}
    return {"latency": time.perf_counter() - start, "ok": ok,
            "tokens": out.get("usage", {}).get("completion_tokens", 0),
            "queue": out.get("powersmc", {}).get("queue_seconds", float("nan")),
            "end": time.perf_counter()}


def summary(out: list[dict], wall: float) -> dict:
    """answers/s, latency and queue-time percentiles, errors, mean tokens."""
    good = [x for x in out if x["ok"]]

    def pct(key: str, q: float) -> float:
        v = sorted(x[key] for x in good)
        return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")

    return {"answers_per_s": len(good) / wall, "p50_s": pct("latency", 0.5),
            "p95_s": pct("latency", 0.95), "queue_p50_s": pct("queue", 0.5),
            "queue_p95_s": pct("queue", 0.95), "errors": len(out) - len(good), "wall_s": wall,
            "mean_tokens": statistics.mean(x["tokens"] for x in good) if good else 0.0}


def closed_loop(url: str, clients: int, bodies: list[dict], timeout: float) -> dict:
    """`clients` threads send `bodies`, each the next one as soon as its answer came."""
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(lambda b: one(client, url, b), bodies))
        return summary(out, time.perf_counter() - start)


def open_loop(url: str, arrivals: list[float], bodies: list[dict], timeout: float) -> dict:
    """Each body sent at its arrival time (seconds from the start), whatever is in flight."""
    out: list[dict] = []
    lock = threading.Lock()
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=len(bodies))) as c:
        start = time.perf_counter()

        def send(body: dict) -> None:
            res = one(c, url, body)
            with lock:
                out.append(res)

        threads = []
        for at, body in zip(arrivals, bodies, strict=True):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            threads.append(threading.Thread(target=send, args=(body,)))
            threads[-1].start()
        for t in threads:
            t.join()
        return summary(out, max(x["end"] for x in out) - start)


def offline(bodies: list[dict], flags: list[str], max_batch: int) -> dict:
    """The same requests submitted at once to one in-process `Scheduler` (no server), on the
    model the servers' `flags` load (backend, device, dtype, threads included)."""
    from powersmc import Scheduler, load_model
    from powersmc.cli_parser import build_parser
    from powersmc.server.execute import chat_prompt_ids
    from powersmc.server.run import model_kwargs

    lm = load_model(**model_kwargs(build_parser().parse_args(["serve", *flags])))
    sched = Scheduler(lm, max_systems=max_batch)
    ids = [chat_prompt_ids(lm, b["messages"]) for b in bodies]
    start = time.perf_counter()
    handles = [sched.submit(p, seed=b.get("seed"), alpha=b["alpha"], particles=b["particles"],
                            max_new_tokens=b["max_tokens"]) for p, b in zip(ids, bodies,
                                                                             strict=True)]
    sched.run()
    wall = time.perf_counter() - start
    results = [h.result() for h in handles]
    sched.close()
    return {"answers_per_s": len(results) / wall, "wall_s": wall,
            "mean_tokens": statistics.mean(len(r.token_ids) for r in results)}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=48, help="requests per level and server")
    ap.add_argument("--rate", type=float, default=0.5, help="open loop: requests per second "
                    "(0: no open loop)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="repetitions per level (medians)")
    ap.add_argument("--seed", type=int, default=0, help="the workload and the arrivals")
    ap.add_argument("--timeout", type=float, default=1200, help="per request, seconds")
    ap.add_argument("--deadline", type=float, default=3600, help="whole run, seconds")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    levels = [int(c) for c in args.clients.split(",")]
    if min(levels) < 1 or args.requests < 1 or args.rounds < 1 or args.rate < 0:
        ap.error("--clients, --requests and --rounds must be >= 1, --rate >= 0")
    bodies = workload(args.requests, args.seed)
    rng = random.Random(args.seed + 1)
    arrivals = [0.0]
    for _ in bodies[1:]:
        arrivals.append(arrivals[-1] + rng.expovariate(args.rate or 1.0))
    flags = ["--threads", str(args.threads), "--max-batch", str(args.max_batch),
             "--max-particles", "64", "--max-tokens-limit", "2048", *extra]
    names = ("continuous", "serial")
    ports = {n: free_port() for n in names}
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))
    log = {n: logs / f"serve-{n}.log" for n in names}
    procs = {n: launch(ports[n], [*flags, *(["--max-batch", "1"] if n == "serial" else [])],
                       log[n]) for n in names}
    started = time.monotonic()
    results: dict[str, dict[str, list[dict]]] = {}
    kinds = [str(c) for c in levels] + (["open"] if args.rate else [])
    try:
        for n, proc in procs.items():
            wait_ready(proc, ports[n], log[n], timeout=300)
            closed_loop(f"http://127.0.0.1:{ports[n]}", 1, bodies[:1], args.timeout)  # warm
        for kind in kinds:
            results[kind] = {n: [] for n in names}
            for r in range(args.rounds):
                for n in names if r % 2 == 0 else names[::-1]:
                    if time.monotonic() - started > args.deadline:
                        raise TimeoutError("--deadline reached")
                    url = f"http://127.0.0.1:{ports[n]}"
                    print(f"{kind} clients, {n} server, round {r + 1}", file=sys.stderr)
                    results[kind][n].append(
                        open_loop(url, arrivals, bodies, args.timeout) if kind == "open"
                        else closed_loop(url, int(kind), bodies, args.timeout))
    except TimeoutError as exc:
        print(f"stopped early: {exc}", file=sys.stderr)
    finally:
        stop(*procs.values())
    print("offline Scheduler", file=sys.stderr)
    try:
        off = [offline(bodies, flags, args.max_batch) for _ in range(args.rounds)]
    except Exception as exc:  # noqa: BLE001 - the servers' figures are still reported
        print(f"the offline run failed: {exc!r}", file=sys.stderr)
        off = []
    report(results, off, args)


def report(results: dict[str, dict[str, list[dict]]], off: list[dict],
           args: argparse.Namespace) -> None:
    offline_rate = statistics.median(o["answers_per_s"] for o in off) if off else float("nan")
    print(f"mixed SMC workload: {args.requests} requests (N 4/8/16, max_tokens 16-128, alpha "
          f"2/4, 1/3 seeded), --max-batch {args.max_batch}, --threads {args.threads}, "
          f"{args.rounds} round(s) (medians); offline Scheduler: {offline_rate:.3f} answers/s")
    print("| clients | server | answers/s | queue p50 s | queue p95 s | p50 s | p95 s | errors "
          "| mean tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    levels = {}
    for kind, by in results.items():
        row: dict = {}
        for n, runs in by.items():
            if not runs:
                continue
            agg = {k: statistics.median(r[k] for r in runs) for k in
                   ("answers_per_s", "queue_p50_s", "queue_p95_s", "p50_s", "p95_s",
                    "mean_tokens")}
            agg["errors"] = sum(r["errors"] for r in runs)
            row[n] = agg
            print(f"| {kind} | {n} | {agg['answers_per_s']:.3f} | {agg['queue_p50_s']:.2f} | "
                  f"{agg['queue_p95_s']:.2f} | {agg['p50_s']:.2f} | {agg['p95_s']:.2f} | "
                  f"{agg['errors']} | {agg['mean_tokens']:.1f} |")
        if len(row) == 2:
            c, w = row["continuous"], row["serial"]
            row["throughput_gain"] = c["answers_per_s"] / w["answers_per_s"]
            row["p95_ratio"] = c["p95_s"] / w["p95_s"]
            row["of_offline"] = c["answers_per_s"] / offline_rate
            print(f"| {kind} | continuous / serial: {row['throughput_gain']:.2f}x "
                  f"throughput, p95 x{row['p95_ratio']:.2f}; continuous / offline: "
                  f"{row['of_offline']:.2f} | | | | | | | |")
        levels[kind] = row | {"runs": by}
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "offline": off,
                                              "levels": levels}, indent=1))
    errors = sum(r["errors"] for runs in results.values() for rs in runs.values() for r in rs)
    if errors:
        raise SystemExit(f"{errors} request(s) failed: a loaded server must answer every one")


if __name__ == "__main__":
    main()
