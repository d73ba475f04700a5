"""`powersmc serve`: its command-line options, and start-up (settings checked, uvicorn
started on 127.0.0.1 unless told otherwise, the model loaded in the background meanwhile:
`/health` answers 503 until it is ready), and the SIGTERM drain."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from powersmc.errors import InputError
from powersmc.server.config import SERVED, ServerConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `serve` beyond the shared model and sampling ones."""
    p.add_argument("--method", default="smc",
                   help="default method: smc, mh, mh-faithful, spower, lowtemp, plain, greedy")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("POWERSMC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $POWERSMC_API_KEY)")
    g.add_argument("--served-model-name", default=None,
                   help="model id at /v1/models (default: --model, or SmolLM2-135M-Instruct)")
    g.add_argument("--max-batch", type=int, default=16,
                   help="most requests' units (particle systems, MH proposals, rollout groups) "
                   "in the batch at once; more wait")
    g.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting; more are answered 429")
    g.add_argument("--max-particles", type=int, default=64, help="cap on a request's particles")
    g.add_argument("--max-tokens-limit", type=int, default=2048, help="cap on max_tokens")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size cap")
    g.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="a request not answered within this (queue included) gets 408 and its "
                   "work is cancelled; a request's 'timeout' field may ask for less "
                   "(default: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long admitted requests may take to finish before they "
                   "are cancelled (503); new requests get 503 at once (default: 30)")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("replicas (Ray Serve; needs the ray extra)")
    r.add_argument("--replicas", type=int, default=None,
                   help="serve K model replicas with Ray Serve behind one endpoint (one GPU "
                   "each on CUDA; on CPU --threads or cores // K threads each); default: one "
                   "process, no Ray")
    r.add_argument("--min-replicas", type=int, default=None,
                   help="with --replicas: autoscale down to this many (Ray Serve autoscaling "
                   "on queued and running requests)")
    r.add_argument("--max-replicas", type=int, default=None,
                   help="with --replicas: autoscale up to this many")
    r.add_argument("--ray-address", default=None,
                   help="with --replicas: join this Ray cluster (default: $RAY_ADDRESS, else "
                   "a new local one)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server settings; raises `InputError` naming the flag on bad values."""
    if not 0 <= args.port <= 65535:
        raise InputError("--port", "an integer in [0, 65535]", args.port)
    defaults = {"method": args.method, "alpha": args.alpha,
                "max_tokens": args.max_new_tokens} | {
        o.name: getattr(args, o.dest) for o in SERVED}
    return ServerConfig(
        model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
        defaults=defaults, max_particles=args.max_particles,
        max_tokens_limit=args.max_tokens_limit, max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, api_key=args.api_key,
        request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout)


def model_kwargs(args: argparse.Namespace) -> dict:
    """`load_model`'s arguments for the server (and each Ray replica): raw-text prompts, a
    model ready for continuous batching."""
    from powersmc.models import load_arguments

    return load_arguments(args, chat=False, continuous=True)


def load(args: argparse.Namespace):
    """The model, with raw-text prompts: /v1/completions is plain text (OpenAI semantics);
    /v1/chat/completions renders messages with the chat template itself."""
    from powersmc.models import load_model

    return load_model(**model_kwargs(args))


def check_replica_args(args: argparse.Namespace) -> None:
    """--min-replicas, --max-replicas and --ray-address need --replicas."""
    if getattr(args, "replicas", None) is None:
        for flag in ("min_replicas", "max_replicas", "ray_address"):
            if getattr(args, flag, None) is not None:
                raise InputError("--" + flag.replace("_", "-"), "used only with --replicas",
                                 getattr(args, flag))


def serve(args: argparse.Namespace) -> int:
    """Check the settings, serve (loading the model in the background) until SIGTERM (drain,
    exit 0) or SIGINT; a model that fails to load stops the server with its error."""
    config = config_from_args(args)
    check_replica_args(args)
    if args.replicas is not None:  # Ray only here: the default path never imports it
        from powersmc.models import ModelSpec
        from powersmc.server.replicas import serve_replicated

        return serve_replicated(args, config, ModelSpec(model_kwargs(args)))
    try:
        import uvicorn

        from powersmc.server.app import create_app
    except ImportError as exc:
        raise InputError("serve", "needs the server extra: pip install 'powersmc[serve]'",
                         exc.name) from None
    def load_model():
        lm = load(args)
        print("powersmc serve: model loaded, ready", file=sys.stderr, flush=True)
        return lm

    app = create_app(None, config, loader=load_model)

    class Server(uvicorn.Server):
        """uvicorn's server with SIGTERM as a graceful drain instead of a prompt stop."""

        def handle_exit(self, sig: int, frame) -> None:
            if sig != signal.SIGTERM:
                super().handle_exit(sig, frame)
                return
            # not recorded as a captured signal, so the process exits 0 once drained;
            # a second SIGTERM cancels what is left at once
            app.state.drain(then=lambda: setattr(self, "should_exit", True))

    server = Server(uvicorn.Config(app, host=args.host, port=args.port,
                                   log_level=args.log_level,
                                   limit_concurrency=config.max_queue + config.max_batch + 16,
                                   timeout_graceful_shutdown=5))
    app.state.lifecycle.on_fatal = lambda: setattr(server, "should_exit", True)
    print(f"powersmc serve: {config.model_name} on http://{args.host}:{args.port}/v1 "
          f"(method {config.defaults['method']}, max batch {config.max_batch}); loading the "
          "model (/health: 503 until ready)", file=sys.stderr, flush=True)
    server.run()
    if app.state.lifecycle.error is not None:
        raise app.state.lifecycle.error
    return 0
