"""How `powersmc serve --replicas K` places its replicas on a Ray cluster: how many, and the
CPUs and GPU each reserves (`plan`, checked against the cluster's resources before anything
starts, so that a bad flag is a one-line error naming it)."""

from __future__ import annotations

from dataclasses import dataclass

from powersmc.errors import InputError


@dataclass(frozen=True)
class Placement:
    """How many replicas, and what each reserves: `threads` CPUs (and one GPU with `gpu`).
    `replicas` is the starting count; with `max_replicas` > `min_replicas` Ray Serve
    autoscales between them on the requests each replica has queued or running."""

    replicas: int
    threads: int
    gpu: bool
    min_replicas: int
    max_replicas: int
    assign_timeout_s: float = 10.0

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas != self.min_replicas


def plan(replicas: int, *, threads: int | None, device: str, cpus: float, gpus: float,
         min_replicas: int | None = None, max_replicas: int | None = None) -> Placement:
    """Check the flags against the cluster's CPUs and GPUs: T = --threads, else CPUs // the
    most replicas; one GPU per replica on CUDA (`device` cuda, or auto on a cluster with
    GPUs)."""
    for flag, value in (("--replicas", replicas), ("--min-replicas", min_replicas),
                        ("--max-replicas", max_replicas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InputError(flag, "an integer >= 1", value)
    if device not in ("auto", "cpu", "cuda"):
        raise InputError("--device", "auto, cpu or cuda with --replicas (Ray gives each "
                         "replica its own GPU)", device)
    low = min_replicas if min_replicas is not None else replicas
    high = max_replicas if max_replicas is not None else replicas
    if not low <= replicas <= high:
        raise InputError("--replicas", f"within --min-replicas ({low}) and --max-replicas "
                         f"({high})", replicas)
    use_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    t = threads or max(1, int(cpus) // high)
    if high * t > cpus:
        raise InputError("--replicas", f"replicas x threads within the Ray cluster's {cpus:g} "
                         "CPUs (lower --replicas, --max-replicas or --threads)",
                         f"{high} x {t}")
    if use_gpu and high > gpus:
        raise InputError("--replicas", f"at most one replica per GPU of the Ray cluster "
                         f"({gpus:g} GPUs)", high)
    return Placement(replicas=replicas, threads=t, gpu=use_gpu, min_replicas=low,
                     max_replicas=high)
