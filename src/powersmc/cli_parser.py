"""The command line's arguments (`build_parser`): the subcommands `powersmc.cli` runs, and
the groups of flags they share (the model to load, the sampling settings and every method
option of `methods.options.OPTIONS`). Bad arguments exit with code 2 and one line."""

from __future__ import annotations

import argparse
from typing import NoReturn

DESCRIPTION = "Command line: `powersmc sample | eval | report | bench | serve`."
LOG_LEVELS = ("debug", "info", "warning", "error")


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


def build_parser() -> argparse.ArgumentParser:
    from powersmc import __version__
    from powersmc.methods.registry import METHODS

    every = ", ".join(METHODS)

    parser = _Parser(prog="powersmc", description=DESCRIPTION)
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
                   help="builtin, builtin-multi, builtin-long, math500, gsm8k, a JSONL path or "
                   "a hub id")
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
