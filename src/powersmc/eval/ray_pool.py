"""Ray workers for `powersmc eval --workers K`: K actors holding one model each, fed work units
(`eval.units`) by the driver, which alone writes the run's files (`eval.store`).

Placement: each worker reserves T CPUs and runs T threads, T = the spec's `threads` (`--threads`)
or else the cluster's CPUs // K; with CUDA (`device` 'cuda', or 'auto' on a cluster with GPUs)
each also reserves one GPU, which Ray makes the only device it sees. Workers are spread over
the nodes.

Faults: a worker runs one unit at a time. A unit whose code raises, or whose worker dies
(killed, out of memory, node lost), is tried again, at most MAX_ATTEMPTS times in all; then its
rows are recorded in failures.jsonl and the run goes on. A dead worker is replaced at once by a
new actor; a worker slot whose replacement fails to start MAX_START_FAILURES times in a row is
given up, and the run stops when none is left. Rows reach the results file only through the
driver, as each unit ends, so killing the driver loses only the units in flight (a re-run
computes them again) and its actors die with it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from powersmc.errors import InputError, WorkerError
from powersmc.eval.store import WORKERS, RunLog
from powersmc.eval.units import Settings, Unit, run_unit
from powersmc.models import ModelSpec, backend_of, describe

MAX_ATTEMPTS = 3
MAX_START_FAILURES = 3


def import_ray() -> Any:
    """The `ray` module, or an error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise InputError("--workers", "Ray, which is not installed: pip install "
                         "'powersmc[ray]'") from None
    return ray


class _Worker:
    """The body of one Ray actor: one model built from a spec, running units on it."""

    def __init__(self, spec: ModelSpec, threads: int) -> None:
        self.spec, self.threads = spec, threads
        self.model: Any = None  # built by `load`

    def load(self) -> dict:
        """Build the model; what the driver records about this worker."""
        import ray

        start = time.perf_counter()
        torch.set_num_threads(self.threads)
        self.model = self.spec.build(self.threads)
        return {"model": describe(self.model), "backend": backend_of(self.model),
                "chat": bool(getattr(self.model, "chat", False)),
                "device": str(self.model.device), "node": ray.util.get_node_ip_address(),
                "threads": self.threads, "load_seconds": time.perf_counter() - start}

    def run(self, unit: Unit, settings: Settings) -> tuple[list[dict], float]:
        """The unit's rows and the seconds it took here."""
        start = time.perf_counter()
        rows = run_unit(self.model, unit, settings)
        return rows, time.perf_counter() - start


@dataclass
class _Slot:
    """One of the K workers: its current actor and what it has done in this run."""

    index: int
    actor: Any = None
    ready: bool = False
    busy: bool = False
    start_failures: int = 0
    info: dict = field(default_factory=dict)
    units: int = 0
    answers: int = 0
    seconds: float = 0.0
    failures: int = 0
    restarts: int = 0

    def stats(self) -> dict:
        return {"worker": self.index, **{k: v for k, v in self.info.items() if k != "chat"},
                "units": self.units, "answers": self.answers, "seconds": self.seconds,
                "answers_per_minute": 60 * self.answers / self.seconds if self.seconds else 0.0,
                "failed_units": self.failures, "restarts": self.restarts}


class WorkerPool:
    """K Ray actors, each holding one model built from `spec`. As a context manager it starts
    them on the Ray session this process is already connected to, else on the cluster at
    `address` (or `RAY_ADDRESS`), else on a new local cluster, and waits for their models; on
    exit it kills them, and disconnects from Ray if it connected. `info` describes the first
    worker's model; `stats` (after `run`) its workers' throughput."""

    def __init__(self, spec: ModelSpec, workers: int, *, address: str | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError("--workers", "an integer >= 1", workers)
        device = str(spec.kwargs.get("device") or "auto")
        if device not in ("auto", "cpu", "cuda"):
            raise InputError("--device", "auto, cpu or cuda with --workers (Ray gives each "
                             "worker its own GPU)", device)
        if address is not None and not str(address).strip():
            raise InputError("--ray-address", "a Ray cluster address (host:port)", address)
        self.spec, self.workers, self.address, self.device = spec, workers, address, device
        self.info: dict = {}
        self._ray = import_ray()
        self._own = False
        self._slots: list[_Slot] = []
        self._pending: dict[Any, tuple[_Slot, int | None]] = {}  # ref -> (slot, unit | load)
        self._last: dict = {}
        self.stats: dict = {}

    def __enter__(self) -> WorkerPool:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            if self.address is not None:
                raise InputError("--ray-address", "unset when this process is already "
                                 "connected to Ray", self.address)
        else:
            if self.address is not None:
                _check_reachable(self.address)
            self._own = True
            # no address: RAY_ADDRESS (as `ray job submit` sets it), else a new local cluster
            # (plain ray.init() would join one `ray start` left on this machine, even a dead one)
            address = self.address or (None if os.environ.get("RAY_ADDRESS") else "local")
            try:
                level = min(logging.WARNING, logging.getLogger().getEffectiveLevel())
                ray.init(address=address, include_dashboard=False,  # its log: --log-level
                         log_to_driver=level <= logging.DEBUG, logging_level=level)
            except ConnectionError as exc:
                raise InputError("--ray-address", "the address of a running Ray cluster "
                                 "(`ray start --head` prints it; a cluster with token "
                                 f"authentication needs RAY_AUTH_MODE=token here): {exc}",
                                 address) from None
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        use_gpu = self.device == "cuda" or (self.device == "auto" and gpus >= 1)
        threads = self.spec.kwargs.get("threads") or max(1, int(cpus) // self.workers)
        if self.workers * threads > cpus:
            raise InputError("--workers", f"workers x threads within the Ray cluster's {cpus:g} "
                             "CPUs (lower --workers or --threads)", f"{self.workers} x {threads}")
        if use_gpu and self.workers > gpus:
            raise InputError("--workers", f"at most one worker per GPU of the Ray cluster "
                             f"({gpus:g} GPUs)", self.workers)
        self._threads = threads
        self._actor = ray.remote(_Worker).options(
            num_cpus=threads, num_gpus=1 if use_gpu else 0, max_restarts=0,
            scheduling_strategy="SPREAD")
        self._slots = [_Slot(i) for i in range(self.workers)]
        for slot in self._slots:
            self._spawn(slot)
        for ref, (slot, _) in list(self._pending.items()):
            try:
                slot.info = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, InputError):
                    raise exc.cause from None
                raise WorkerError(f"a Ray worker could not load the model: {_error(exc)}"
                                   ) from None
            except ray.exceptions.RayError as exc:
                raise WorkerError(f"a Ray worker died loading the model: {_error(exc)}"
                                   ) from None
            del self._pending[ref]
            slot.ready = True
        self.info = dict(self._slots[0].info)

    def _spawn(self, slot: _Slot) -> None:
        slot.actor = self._actor.remote(self.spec, self._threads)
        slot.ready = slot.busy = False
        self._pending[slot.actor.load.remote()] = (slot, None)

    def run(self, units: list[Unit], settings: Settings, log: RunLog) -> None:
        """Run `units` on the workers; `log` writes each unit's rows as it ends, and each
        failed unit; per-worker throughput goes to the run directory's workers.json."""
        self.stats = {}
        if not units:
            return
        def done(i: int, rows: list[dict]) -> None:
            for row in rows:
                log.write(row)

        start = time.perf_counter()
        try:
            self._drive([(u, settings) for u in units], done=done,
                        failed=lambda i, error, n: log.fail(units[i].keys, error, n))
        finally:
            self._write_stats(log, time.perf_counter() - start)

    def run_each(self, jobs: list[tuple[Unit, Settings]]) -> list[list[dict]]:
        """Each job's rows, in order, the jobs spread over the workers (`--budget`'s
        calibration points); a job that fails on every attempt raises `WorkerError`."""
        got: dict[int, list[dict]] = {}
        errors: list[str] = []
        self._drive(jobs, done=got.__setitem__, failed=lambda i, error, n: errors.append(error))
        if errors:
            raise WorkerError(f"a unit failed on every attempt: {errors[0]}")
        return [got[i] for i in range(len(jobs))]

    def _drive(self, jobs: list[tuple[Unit, Settings]], *,
               done: Callable[[int, list[dict]], object],
               failed: Callable[[int, str, int], object]) -> None:
        """Run `jobs` on the ready workers, retried as the module docstring says: `done(i,
        rows)` as job i ends, `failed(i, error, attempts)` when it has failed for good."""
        ray = self._ray
        for slot in self._slots:  # the figures are this run's
            slot.units = slot.answers = slot.failures = slot.restarts = 0
            slot.seconds = 0.0
        queue = deque(range(len(jobs)))
        attempts = [0] * len(jobs)
        while queue or any(i is not None for _, i in self._pending.values()):
            for slot in self._slots:
                if queue and slot.ready and not slot.busy:
                    u = queue.popleft()
                    slot.busy = True
                    self._pending[slot.actor.run.remote(*jobs[u])] = (slot, u)
            if not self._pending:
                raise WorkerError(f"every Ray worker failed to start: {self._last}")
            [ref], _ = ray.wait(list(self._pending), num_returns=1)
            slot, i = self._pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as exc:
                died = not isinstance(exc, ray.exceptions.RayTaskError)
                error = ("worker died: " if died else "") + _error(exc)
                self._last = {"worker": slot.index, "error": error}
                if i is not None:
                    attempts[i] += 1
                    if attempts[i] < MAX_ATTEMPTS:
                        queue.appendleft(i)
                    else:
                        failed(i, error, attempts[i])
                        slot.failures += 1
                slot.busy = False
                if died or i is None:
                    self._replace(slot, failed_start=i is None)
                continue
            slot.busy = False
            if i is None:
                slot.info, slot.ready, slot.start_failures = value, True, 0
                continue
            rows, seconds = value
            done(i, rows)
            slot.units, slot.answers, slot.seconds = (
                slot.units + 1, slot.answers + len(rows), slot.seconds + seconds)

    def _replace(self, slot: _Slot, failed_start: bool) -> None:
        """Kill the slot's actor and start a new one, unless its starts keep failing."""
        self._ray.kill(slot.actor)
        slot.ready = False
        slot.restarts += 1
        slot.start_failures += failed_start
        if slot.start_failures < MAX_START_FAILURES:
            self._spawn(slot)

    def _write_stats(self, log: RunLog, seconds: float) -> None:
        answers = sum(s.answers for s in self._slots)
        self.stats = {"workers": [s.stats() for s in self._slots], "seconds": seconds,
                      "answers": answers,
                      "answers_per_minute": 60 * answers / seconds if seconds else 0.0,
                      "failed_rows": log.failed}
        (log.out / WORKERS).write_text(json.dumps(self.stats, indent=2))

    def summary(self) -> str:
        """Per-worker throughput of the last `run`, one line each, and the total."""
        if not self.stats:
            return "workers: no unit left to run"
        lines = [f"worker {w['worker']} ({w.get('node', '?')}, {w.get('device', '?')}, "
                 f"threads={w.get('threads', '?')}): {w['answers']} answers in "
                 f"{w['seconds']:.1f} s busy, {w['answers_per_minute']:.1f} answers/min, "
                 f"{w['failed_units']} failed units, {w['restarts']} restarts"
                 for w in self.stats["workers"]]
        return "\n".join([*lines, f"all workers: {self.stats['answers']} answers in "
                          f"{self.stats['seconds']:.1f} s, "
                          f"{self.stats['answers_per_minute']:.1f} answers/min"])

    def close(self) -> None:
        """Kill the workers; disconnect from Ray if this pool connected (a local cluster it
        started stops)."""
        for slot in self._slots:
            if slot.actor is not None:
                self._ray.kill(slot.actor)
        self._slots, self._pending = [], {}
        if self._own and self._ray.is_initialized():
            self._ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail at once on a host:port where nothing listens (Ray itself retries for minutes);
    'auto', 'local' and ray:// addresses are left to Ray."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise InputError("--ray-address", "host:port of a running Ray cluster (`ray start "
                         "--head` prints it); nothing answers there", address) from None


def _error(exc: BaseException) -> str:
    """One line: a worker's own exception as 'Type: message', or Ray's own first line."""
    cause = getattr(exc, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
