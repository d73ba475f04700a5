"""Command line: `powersmc sample | eval | report | bench | serve`.

Bad input exits with code 2 and one line on stderr naming the argument, never a traceback.
stdout is the result (with --json: exactly one JSON document), stderr the log: whatever else
writes to stdout while a command runs (a library's logger, a C extension) goes to stderr, and
third-party logs are at `--log-level` (default warning).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO

from powersmc.errors import InputError, WorkerError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    g.add_argument("--backend", default="auto",
                   help="auto (llama.cpp for a .gguf on CPU, else transformers), llama.cpp, "
                        "transformers or vllm (needs the vllm extra)")
    g.add_argument("--kv-cache-gib", type=float, default=None,
                   help="vllm: KV cache size in GiB (default: 2 on CPU)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--weights", default="auto",
                   help="llama.cpp: auto (F16 copy for small Q4_1/Q5_1 files), file, f16, bf16 "
                   "or q8_0 (a copy in that type, written once)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (transformers)")
    g.add_argument("--cache", default="auto", choices=("auto", "static", "dynamic"),
                   help="transformers: KV cache (auto: static and compiled for Llama/Qwen2 "
                   "on CUDA, static for serve's continuous batching, dynamic elsewhere)")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="transformers: torch.compile the static cache's decode step (auto: on "
                   "CUDA; off: always eager, no compilation time)")
    g.add_argument("--raw", action="store_true", help="raw text prompts, no chat template")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The shared settings, then every method option (`methods.options.OPTIONS`)."""
    from powersmc.methods.options import OPTIONS

    g = p.add_argument_group("sampling")
    g.add_argument("--alpha", type=float, default=4.0, help="power exponent (>= 1)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    for o in OPTIONS:
        g.add_argument(o.cli, type=o.parse or o.kind, default=o.default, help=o.help)


def method_options(args: argparse.Namespace) -> dict:
    """Method-specific settings from the CLI, in the samplers' own argument names. Options
    added later (not `recorded`) are left out at their defaults, so runs made before them
    still resume."""
    from powersmc.methods.options import OPTIONS

    return {o.name: getattr(args, o.dest) for o in OPTIONS
            if o.recorded or getattr(args, o.dest) != o.default}


def build_parser() -> argparse.ArgumentParser:
    from powersmc import __version__
    from powersmc.methods.registry import METHODS

    every = ", ".join(METHODS)

    parser = _Parser(prog="powersmc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                        help="level of the log on stderr, third-party libraries' included "
                        "(vLLM, llama.cpp, Ray, Transformers; default: warning)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("sample", help="sample one answer for a prompt")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    _model_args(s)
    _sampling_args(s)
    s.add_argument("--method", default="smc", help=f"one of {every}")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--json", action="store_true", help="print the result object as JSON")
    s.add_argument("--trace", default=None, metavar="FILE.png",
                   help="draw the run: ESS and resampling (SMC family), acceptance per block "
                   "(MH family), swap acceptance per rung pair (ppt)")
    s.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("eval", help="evaluate methods on a data set (resumable)")
    e.add_argument("--dataset", required=True,
                   help="builtin, builtin-multi, math500, gsm8k, a JSONL path or a hub id")
    e.add_argument("--methods", default="plain,lowtemp,mh,spower,smc",
                   help=f"comma-separated, of {every}")
    e.add_argument("--seeds", default="0", help="comma-separated seeds")
    e.add_argument("--limit", type=int, default=None, help="first N problems (after --subset)")
    e.add_argument("--subset", default=None, help="'i:j', 'level=5', 'subject=Algebra'")
    e.add_argument("--template", default=None,
                   help="karan-du, chat or a file with {problem} (default: chat for chat models)")
    e.add_argument("--out", required=True, help="run directory (re-run to resume)")
    e.add_argument("--batch-prompts", type=int, default=1,
                   help="run Power-SMC on this many problems per batch (P x N particles)")
    e.add_argument("--workers", type=int, default=None,
                   help="run on K Ray workers, one model each (one GPU each on CUDA; "
                        "cores // K threads each on CPU); needs powersmc[ray]")
    e.add_argument("--ray-address", default=None,
                   help="with --workers: join this Ray cluster (default: start a local one)")
    e.add_argument("--budget", type=int, default=None, metavar="N",
                   help="equal compute: set each method's own knob (particles, samples, moves, "
                   "rollouts) for the mean token-evals of Power-SMC with N particles, "
                   "calibrated on the first problems")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--json", action="store_true",
                   help="print the summary (summary.json) and the workers' throughput as JSON")
    _model_args(e)
    _sampling_args(e)

    r = sub.add_parser("report", help="Table 1 and a plot from a run directory")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--reference", default=None, metavar="METHOD",
                   help="test every method against this one (paired McNemar; default: smc)")
    r.add_argument("--json", action="store_true", help="print the summary (summary.json) as JSON")

    b = sub.add_parser("bench", help="Sec. 6 measured: s(b), SMC overhead, MH vs SMC, profile")
    b.add_argument("--prompt", default="Explain why the sky is blue.")
    b.add_argument("--particles", type=int, default=16)
    b.add_argument("--tokens", type=int, default=64, help="forced generation length T")
    b.add_argument("--alpha", type=float, default=4.0)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--batches", default="1,2,4,8,16,32,64")
    b.add_argument("--prompts", type=int, default=4,
                   help="prompts P batched together in the several-prompts measurement")
    b.add_argument("--mh-tokens", type=int, default=32)
    b.add_argument("--mh-blocks", type=int, default=4)
    b.add_argument("--mh-moves", type=int, default=2)
    b.add_argument("--out", default="bench-out")
    b.add_argument("--json", action="store_true", help="print the measurements (bench.json)")
    _model_args(b)

    from powersmc.server.run import add_arguments as _serve_args

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server answering with Power-SMC")
    _model_args(v)
    _sampling_args(v)
    _serve_args(v)
    return parser


def _load_kwargs(args: argparse.Namespace) -> dict:
    """`load_model`'s arguments for `sample` and `eval` (and each Ray worker)."""
    from powersmc.models import load_arguments

    return load_arguments(args, chat=False if args.raw else None)


def _load(args: argparse.Namespace):
    from powersmc.models import load_model

    return load_model(**_load_kwargs(args))


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise InputError("--prompt-file", "a readable text file", args.prompt_file) from exc


def _check_sampling(args: argparse.Namespace) -> None:
    """Validate cheap arguments before the (slow) model load; errors name the flag."""
    from powersmc.methods import common
    from powersmc.methods.options import OPTIONS, check_all
    from powersmc.methods.registry import check_method, check_select_for

    common.check_alpha(args.alpha)
    common.check_positive_int("max_new_tokens", args.max_new_tokens)
    check_all({o.name: getattr(args, o.dest) for o in OPTIONS}, names=lambda o: o.cli)
    methods = getattr(args, "methods_list", [check_method(args.method)])
    try:
        check_select_for(methods, args.select)
    except InputError as exc:
        raise InputError("--select", exc.allowed, exc.got) from None


def cmd_sample(args: argparse.Namespace, out: TextIO) -> int:
    from powersmc.runtime.api import run_method

    prompt = _read_prompt(args)
    if not prompt.strip():
        raise InputError("prompt", "a non-empty prompt", prompt)
    _check_sampling(args)
    if args.trace is not None:
        from powersmc.trace import check_trace

        check_trace(args.method)
    lm = _load(args)
    opts = method_options(args) | {"progress": not args.no_progress}
    result = run_method(args.method, lm, prompt, alpha=args.alpha,
                        max_new_tokens=args.max_new_tokens, seed=args.seed, **opts)
    if args.trace is not None:
        from powersmc.trace import plot_trace

        plot_trace(result, args.trace)
    if args.json:
        _print_json(out, result.to_dict())
    else:
        print(result.text, file=out)
    return 0


def _int_list(name: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(name, "comma-separated integers", text) from None


def cmd_eval(args: argparse.Namespace, out: TextIO) -> int:
    from powersmc.eval.budget import check_budget
    from powersmc.eval.builtin import BUILTIN_SETS
    from powersmc.eval.data import load_problems
    from powersmc.eval.labels import model_label
    from powersmc.eval.prompts import load_template
    from powersmc.eval.ray_pool import WorkerPool
    from powersmc.eval.report import report
    from powersmc.eval.runner import run_eval
    from powersmc.methods.registry import check_method
    from powersmc.models import ModelSpec, backend_of, describe

    methods = [check_method(m.strip()) for m in args.methods.split(",") if m.strip()]
    seeds = _int_list("--seeds", args.seeds)
    if not methods:
        raise InputError("--methods", "at least one method", args.methods)
    args.method, args.methods_list = methods[0], methods
    if args.batch_prompts < 1:
        raise InputError("--batch-prompts", "an integer >= 1", args.batch_prompts)
    if args.ray_address is not None and args.workers is None:
        raise InputError("--ray-address", "used only with --workers", args.ray_address)
    check_budget(args.budget)
    if args.budget is not None and args.workers is not None:
        raise InputError("--budget", "a run in this process (its calibration runs here; not "
                         "with --workers yet)", args.budget)
    _check_sampling(args)
    problems = load_problems(args.dataset, limit=args.limit, subset=args.subset)
    builtin = args.dataset in BUILTIN_SETS
    if builtin:  # few-shot completion prompts: raw text, used as they are
        args.raw = True
    with ExitStack() as stack:
        if args.workers is None:
            model = _load(args)
            info = {"model": describe(model), "backend": backend_of(model), "chat": model.chat}
        else:  # the workers load the model; the first one says what it is
            model = stack.enter_context(WorkerPool(ModelSpec(_load_kwargs(args)), args.workers,
                                                   address=args.ray_address))
            info = model.info
        template = "{problem}" if builtin and args.template is None else load_template(
            args.template or ("chat" if info["chat"] else "karan-du"))
        run_eval(model, problems, methods=methods, seeds=seeds, out_dir=args.out,
                 template=template, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                 options=method_options(args),
                 config_extra={"dataset": args.dataset,
                               "model": args.model or model_label(info["model"]),
                               "backend": info["backend"],
                               "subset": args.subset, "limit": args.limit},
                 progress=not args.no_progress, batch_prompts=args.batch_prompts,
                 budget=args.budget)
        pool = None if args.workers is None else model
    text = report(args.out)
    if args.json:
        _print_json(out, {"summary": _summary(args.out),
                          "workers": pool.stats if pool is not None else None})
        return 0
    print(text, file=out)
    if pool is not None:
        print(pool.summary(), file=out)
    return 0


def _summary(out_dir: str | Path) -> Any:
    """The summary `report` wrote into a run directory."""
    return json.loads((Path(out_dir) / "summary.json").read_text())


def cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    from powersmc.eval.report import report

    text = report(args.dir, args.reference)
    if args.json:
        _print_json(out, {"summary": _summary(args.dir)})
    else:
        print(text, file=out)
    return 0


def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from powersmc.bench import OTHER_PROMPTS, run_bench
    from powersmc.methods import common

    common.check_alpha(args.alpha)
    for name in ("particles", "tokens", "repeats", "mh_tokens", "mh_blocks", "prompts"):
        common.check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    common.check_nonnegative_int("--mh-moves", args.mh_moves)
    if args.prompts > 1 + len(OTHER_PROMPTS):
        raise InputError("--prompts", f"1 to {1 + len(OTHER_PROMPTS)} (the bench's built-in "
                         "prompts)", args.prompts)
    batches = _int_list("--batches", args.batches)
    if not batches or min(batches) < 1 or 1 not in batches:
        raise InputError("--batches", "comma-separated sizes >= 1 that include 1", args.batches)
    from powersmc.models import backend_of

    names = [b.strip() for b in args.backend.split(",") if b.strip()] or ["auto"]
    if names[0] == "vllm":  # the full bench needs per-step log-probs (s(b), the profile)
        raise InputError("--backend", "a first backend with next-token log-probabilities "
                         "(transformers, llama.cpp); vllm may follow it, and "
                         "benchmarks/vllm_bench.py times vLLM against its own sampling",
                         args.backend)
    lms, load = [], {}
    for name in names:  # the first backend gets the full bench; the others run beside it
        args.backend = name
        start = time.perf_counter()
        lms.append(_load(args))
        load[backend_of(lms[-1])] = time.perf_counter() - start
    lm, others = lms[0], {backend_of(x): x for x in lms[1:]}
    result = run_bench(lm, args.prompt, particles=args.particles, tokens=args.tokens,
                       alpha=args.alpha, repeats=args.repeats, batches=batches,
                       mh_tokens=args.mh_tokens, mh_blocks=args.mh_blocks,
                       mh_moves=args.mh_moves, out_dir=args.out, prompts=args.prompts,
                       others=others, name=backend_of(lm), load_seconds=load,
                       progress=lambda m: print(m, file=sys.stderr))
    if args.json:
        _print_json(out, result)
    else:
        print((Path(args.out) / "bench.md").read_text(), file=out)
    return 0


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from powersmc.server.run import serve

    _check_sampling(args)
    return serve(args)


COMMANDS = {"sample": cmd_sample, "eval": cmd_eval, "report": cmd_report, "bench": cmd_bench,
            "serve": cmd_serve}
LOG_LEVELS = ("debug", "info", "warning", "error")


def _print_json(out: TextIO, obj: Any) -> None:
    json.dump(obj, out)
    out.write("\n")


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
