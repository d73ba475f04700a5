"""The subcommands of `powersmc` (`COMMANDS`): each takes the parsed arguments and the stream
its result goes to, checks the cheap arguments before the (slow) model load, and returns the
exit code. Bad input raises `InputError` naming the flag; `powersmc.cli` turns it into one
line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from powersmc.errors import InputError


def method_options(args: argparse.Namespace) -> dict:
    """Method-specific settings from the CLI, in the samplers' own argument names. Options
    added later (not `recorded`) are left out at their defaults, so runs made before them
    still resume."""
    from powersmc.methods.options import OPTIONS

    return {o.name: getattr(args, o.dest) for o in OPTIONS
            if o.recorded or getattr(args, o.dest) != o.default}


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


def _print_json(out: TextIO, obj: Any) -> None:
    json.dump(obj, out)
    out.write("\n")


COMMANDS = {"sample": cmd_sample, "eval": cmd_eval, "report": cmd_report, "bench": cmd_bench,
            "serve": cmd_serve}
