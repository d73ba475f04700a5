"""`/health` and `/metrics` of a replicated server (`ingress.py`), from the latest report of
each replica: its own `/health` (status, body) and `/metrics` text. No Ray here.

- `/health`: 200 when at least one replica is ready. The body has the single server's fields
  (status, model, queued, running, in_flight, stats) summed over the replicas, plus
  `replicas` (each replica's own /health body, with its pid, node and threads) and
  `ready_replicas`. Status: ok, `loading` (no replica heard from yet) or `unavailable`.
- `/metrics`: every family of the replicas' metrics, each sample once per replica with a
  `replica` label and once summed over them with `replica="all"` (so `{replica="all"}` reads
  as the single server's figure; a replica that dies leaves the sum, which counts as a
  counter reset); plus the ingress's own `powersmc_replicas_ready` and
  `powersmc_ingress_errors_total{status,code}` (503s and 429s it answered itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

SUMMED = ("queued", "running", "in_flight")


class FleetMetrics:
    """The ingress's own counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.errors = Counter("powersmc_ingress_errors", "Error responses the ingress answered "
                              "itself (no replica ready, a replica died, queues full)",
                              ["status", "code"], registry=self.registry)

    def error(self, status: int, code: str | None) -> None:
        self.errors.labels(str(status), code or "none").inc()


def _health_body(data: dict[str, Any]) -> dict[str, Any]:
    raw = data.get("health", b"")
    try:
        body = json.loads(raw)
    except (TypeError, ValueError):
        body = {}
    return body if isinstance(body, dict) else {}


def fleet_health(reports: dict[str, dict[str, Any]], model: str) -> tuple[dict[str, Any], bool]:
    """The fleet's /health body, and whether any replica is ready."""
    per = {}
    for rid, data in reports.items():
        per[rid] = _health_body(data) | {k: data.get(k) for k in ("pid", "node", "threads")}
    ready = sum(1 for data in reports.values() if data.get("status") == 200)
    stats: dict[str, float] = {}
    for body in per.values():
        for key, value in (body.get("stats") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                stats[key] = stats.get(key, 0) + value
    body = {"status": "ok" if ready else ("unavailable" if reports else "loading"),
            "model": model, "ready_replicas": ready, "replicas": per, "stats": stats}
    for key in SUMMED:
        body[key] = sum(int(b.get(key) or 0) for b in per.values())
    return body, ready > 0


class _Families:
    """A collector yielding fixed, already built metric families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


def merge_metrics(texts: dict[str, str]) -> list[Metric]:
    """The replicas' Prometheus texts (replica id -> text) as families whose samples carry a
    `replica` label, plus their sum under `replica="all"` (`_created` samples not summed)."""
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for rid, text in texts.items():
        for fam in text_string_to_metric_families(text):
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                sums[fam.name] = {}
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "replica": rid}, s.value)
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                sums[fam.name][key] = sums[fam.name].get(key, 0.0) + s.value
    for name, fam in families.items():
        for (sample, labels), value in sums[name].items():
            fam.add_sample(sample, {**dict(labels), "replica": "all"}, value)
    return list(families.values())


def fleet_metrics(reports: dict[str, dict[str, Any]], own: FleetMetrics) -> tuple[bytes, str]:
    """The fleet's /metrics text and its content type."""
    texts = {}
    for rid, data in reports.items():
        raw = data.get("metrics", b"")
        texts[rid] = raw.decode() if isinstance(raw, bytes) else str(raw)
    registry = CollectorRegistry()
    ready = Metric("powersmc_replicas_ready", "Replicas whose /health is 200", "gauge")
    ready.add_sample("powersmc_replicas_ready", {},
                     float(sum(1 for d in reports.values() if d.get("status") == 200)))
    registry.register(_Families([*merge_metrics(texts), ready]))
    return generate_latest(registry) + generate_latest(own.registry), CONTENT_TYPE_LATEST
