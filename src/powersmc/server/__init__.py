"""`powersmc serve`: an OpenAI-compatible HTTP server answering with Power-SMC (and the other
methods), batching concurrent SMC requests into one `smc_sample_many` call.

Modules: `config` (settings), `body` (reading a JSON body safely), `schemas` (request
bodies), `jobs` (defaults and checks), `batching` (bounded queue and the worker thread that
owns the model), `execute` (running a batch), `plain` (plain sampling with top_p / top_k),
`responses` (OpenAI bodies and stream chunks), `metrics` (Prometheus metrics), `lifecycle`
(loading / ready / draining), `app` (FastAPI routes), `run` (the CLI command). Needs the
`serve` extra.
"""

from powersmc.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]


def create_app(lm, config: ServerConfig, *, loader=None):
    """The FastAPI app serving `lm`, or the model `loader()` returns, loaded in the background
    (imported lazily: FastAPI is an optional dependency)."""
    from powersmc.server.app import create_app as _create_app

    return _create_app(lm, config, loader=loader)
