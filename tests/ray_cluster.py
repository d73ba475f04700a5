"""A local Ray cluster for the tests that need one (`test_ray_eval`, the replica tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TESTS = Path(__file__).parent


@contextmanager
def local_ray(num_cpus: int, **init) -> Iterator[str]:
    """Start a local Ray cluster of `num_cpus` logical CPUs and no GPU whose workers find the
    tests' helper modules (more `ray.init` arguments in `init`); yields its address and shuts
    it down at the end."""
    import ray

    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, **init)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
