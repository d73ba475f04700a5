import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    """Under pytest-xdist, give each worker its own share of the cores.

    Two workers each running two llama.cpp or torch threads on two cores would spin against
    each other; pinned, each engine sees one core (llama.cpp's default thread count follows
    the affinity mask) and the workers run side by side.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not hasattr(os, "sched_setaffinity"):
        return
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0))
    mine = set(cores[int(worker.removeprefix("gw")) % count::count]) or set(cores)
    os.sched_setaffinity(0, mine)
    import torch

    torch.set_num_threads(len(mine))


# Files whose module-scoped fixtures start a server, Ray, Ray Serve or vLLM: under xdist each
# runs whole on one worker, so its fixture starts once; every other test is handed out on its
# own. (xdist's own `--dist loadgroup` marks do not reach pytest 9.2's node ids.)
ONE_WORKER = {"test_ray_eval", "test_server_app", "test_server_fuzz", "test_server_live",
              "test_server_replicas", "test_server_replicas_lifecycle",
              "test_server_replicas_live", "test_vllm_backend"}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if Path(path).stem in ONE_WORKER else nodeid

    return OneWorkerFiles(config, log)


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default model on the Transformers backend, loaded once per session."""
    from powersmc import load_model

    return load_model(backend="transformers", device="cpu")


@pytest.fixture(scope="session")
def llama_lm():
    """The embedded default model on the llama.cpp backend, loaded once per session."""
    from powersmc import load_model

    return load_model(backend="llama.cpp", device="cpu")
