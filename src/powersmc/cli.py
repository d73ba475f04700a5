"""Command line: `powersmc sample | eval | report | bench | serve`.

Bad input exits with code 2 and one line on stderr naming the argument, never a traceback.
stdout is the result (with --json: exactly one JSON document), stderr the log: whatever else
writes to stdout while a command runs (a library's logger, a C extension) goes to stderr, and
third-party logs are at `--log-level` (default warning). The arguments are in `cli_parser`,
the subcommands in `cli_commands`; this module runs one (`main`, the `powersmc` script).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from powersmc.cli_commands import COMMANDS, cmd_serve
from powersmc.cli_parser import build_parser
from powersmc.errors import InputError, WorkerError


def set_log_level(level: str | None) -> None:
    """Python logging (root logger, on stderr) and the libraries that configure their own
    logging at import (vLLM, Transformers) at `level`; None: warning, unless their own
    environment variables say otherwise. llama.cpp's log reaches the `powersmc.llama_cpp`
    logger at debug; Ray's follows the root logger's level."""
    name = (level or "warning").upper()
    logging.basicConfig(level=name, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(name)
    for var in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY"):
        if level is not None:
            os.environ[var] = name if var.startswith("VLLM") else level
        else:
            os.environ.setdefault(var, name if var.startswith("VLLM") else "warning")
    if "transformers" in sys.modules:  # imported before this call: set it directly too
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(getattr(logging, os.environ["TRANSFORMERS_VERBOSITY"].upper()))


@contextmanager
def result_stream() -> Iterator[TextIO]:
    """The stream a command writes its result to (the process's stdout). While the command
    runs, everything else written to stdout goes to stderr: at the file-descriptor level when
    sys.stdout is fd 1 (so C extensions and loggers bound to sys.stdout are caught too: vLLM's
    engine logs there), else (stdout replaced, as under a test's capture) at the Python level."""
    out = sys.stdout
    try:
        fd = out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    if fd != 1:
        sys.stdout = sys.stderr
        try:
            yield out
        finally:
            sys.stdout = out
        return
    out.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    result = open(saved, "w", encoding=out.encoding, errors=out.errors, closefd=False)
    try:
        yield result
    finally:
        result.flush()
        out.flush()
        os.dup2(saved, 1)
        result.close()
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_log_level(args.log_level)
    try:
        if args.command == "serve":  # long-running; its log is uvicorn's (stderr)
            return cmd_serve(args, sys.stdout)
        with result_stream() as out:
            return COMMANDS[args.command](args, out)
    except InputError as exc:
        print(f"powersmc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"powersmc {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
