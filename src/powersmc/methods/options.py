"""Every method option declared once: name, type, default, which methods take it, its check and
its help. The CLI's flags (`cli`), the server's request fields, defaults and 4xx messages
(`server.schemas`, `server.config`, `server.jobs`), the evaluation's recorded options and the
samplers' own checks are all derived from `OPTIONS`, so they cannot drift apart.

The shared settings every method takes (alpha, max_new_tokens, seed) are not here: each
entry point names them itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from powersmc.errors import InputError
from powersmc.methods.common import check_ess_threshold, check_nonnegative_int, check_positive_int
from powersmc.methods.mh import check_cut_power
from powersmc.methods.ppt import check_ladder
from powersmc.methods.program import check_tau
from powersmc.methods.selection import check_select
from powersmc.resampling import get_resampler

SMC = ("smc", "smc-adapted", "smc-rm", "ccps")
"""The Power-SMC family: Algorithm 1 with its resampling options."""
MH = ("mh", "mh-faithful", "ecmh", "ecmh-faithful")
ORDERS = ("standard", "adapted")


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise InputError("order", f"one of {', '.join(ORDERS)}", order)
    return order


def check_resample_align(align: int | str, name: str = "resample_align") -> int | str:
    if align == "block" or (isinstance(align, int) and not isinstance(align, bool)
                            and align >= 1):
        return align
    raise InputError(name, "a positive integer or 'block' (the engine's KV block)", align)


def _resampler(name: str, value: str) -> str:
    get_resampler(value)
    return value


def _ladder_arg(text: str) -> list[float] | str:
    """--alphas as the option's value: comma-separated numbers (left as text if not)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return text


def _align_arg(text: str) -> int | str:
    """--resample-align as the option's value: an integer, or 'block'."""
    return int(text) if text.isdigit() else text


@dataclass(frozen=True)
class Option:
    """One method option (see the module docstring).

    check(name, value) raises `InputError` naming `name` for a bad value. `flag`: the CLI
    flag (default --name with dashes); `parse`: how the CLI reads it (default: `kind`).
    `recorded`: an evaluation records it in its config even at its default (the options of
    the first runs, so that those runs still resume; later options are recorded only when
    set). `served`: a request field of `powersmc serve`."""

    name: str
    kind: type
    default: Any
    methods: tuple[str, ...]
    help: str
    check: Callable[[str, Any], Any]
    flag: str = ""
    parse: Callable[[str], Any] | None = None
    recorded: bool = False
    served: bool = True

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.cli[2:].replace("-", "_")

    def validate(self, value: Any, name: str | None = None) -> Any:
        """The value, checked (None: the default); errors name `name` (default: the option)."""
        if value is None:
            return self.default
        try:
            return self.check(self.name, value)
        except InputError as exc:
            if name is None or exc.argument != self.name:
                raise
            raise InputError(name, exc.allowed, exc.got) from None


OPTIONS: tuple[Option, ...] = (
    Option("particles", int, 16, (*SMC, "bon", "maj"),
           "SMC particles N (best-of-N, maj: their samples N)", check_positive_int,
           recorded=True),
    Option("ess_threshold", float, 0.5, SMC, "resample when ESS < k*N (0: never)",
           lambda n, v: check_ess_threshold(v), recorded=True),
    Option("resampler", str, "systematic", ("smc", "smc-adapted", "smc-rm"),
           "systematic, multinomial, stratified, residual or chopthin", _resampler,
           recorded=True),
    Option("ramp_tokens", int, 0, ("smc", "smc-adapted", "ccps"),
           "linear alpha-ramp length (0: off)",
           check_nonnegative_int, recorded=True),
    Option("order", str, "standard", ("smc",),
           "SMC: standard (Algorithm 1) or adapted (resample before the draw)",
           lambda n, v: check_order(v)),
    Option("resample_align", int, "block", SMC,
           "SMC: resample only where the length is 1 mod B; 'block' (default): wherever the "
           "engine copies a row without recomputation (at once, as Algorithm 1, on llama.cpp "
           "and Transformers; on vLLM its KV block); 1: at once on every engine",
           lambda n, v: check_resample_align(v, n), parse=_align_arg, served=False),
    Option("rounds", int, 1, ("smc", "smc-adapted", "ccps"), "SMC: independent particle "
           "systems, combined by their evidence", check_positive_int, served=False),
    Option("select", str, "sample", ("smc", "smc-adapted", "smc-rm", "bon"),
           "the answer of a particle method: sample (drawn, the paper's), vote (most weight), "
           "majority (most particles) or consensus (most distinct trajectories, CCPS)",
           lambda n, v: check_select(v)),
    Option("rejuvenate_moves", int, 1, ("smc-rm",),
           "smc-rm: MH moves per particle after each resampling", check_nonnegative_int),
    Option("num_blocks", int, 16, MH, "MH: number of blocks K", check_positive_int,
           flag="--mh-blocks", recorded=True),
    Option("mh_moves", int, 10, (*MH, "ppt"), "MH: moves per block M (ppt: rounds per stage)",
           check_nonnegative_int, recorded=True),
    Option("cut_power", float, 4.0, ("ecmh", "ecmh-faithful"),
           "ecmh: exponent beta of the entropy cut law", lambda n, v: check_cut_power(v)),
    Option("alphas", list, None, ("ppt",), "ppt: the ladder, comma-separated increasing "
           "exponents >= 1 (default: 4 rungs, geometric from 1 + (alpha-1)/2 to alpha)",
           lambda n, v: check_ladder(v), parse=_ladder_arg),
    Option("stage_tokens", int, 192, ("ppt",), "ppt: tokens per stage B",
           check_positive_int),
    Option("candidates", int, 8, ("spower",), "Ji et al.: top-K candidates K",
           check_positive_int, recorded=True),
    Option("rollouts", int, 8, ("spower",), "Ji et al.: rollouts M per candidate",
           check_positive_int, recorded=True),
    Option("horizon", int, 192, ("spower",), "Ji et al.: rollout length", check_positive_int,
           recorded=True),
    Option("bon_samples", int, None, ("bon",), "best-of-N: samples N (default: --particles)",
           check_positive_int, served=False),
    Option("maj_samples", int, None, ("maj",), "maj: samples N (default: --particles)",
           check_positive_int),
    Option("temperature", float, 1.0, ("maj",), "maj: the samples' temperature",
           lambda n, v: check_tau(v, n), served=False),
)
BY_NAME = {o.name: o for o in OPTIONS}


def taken_by(method: str) -> tuple[Option, ...]:
    """The options `method` takes."""
    return tuple(o for o in OPTIONS if method in o.methods)


def check_all(values: dict[str, Any], names: Callable[[Option], str] | None = None,
              only: Iterable[str] | None = None) -> dict[str, Any]:
    """Every declared option in `values` checked (None or absent: its default); `names`
    gives the name an error reports for each option (the CLI: its flag)."""
    keep = set(only) if only is not None else None
    return {o.name: o.validate(values.get(o.name), names(o) if names else None)
            for o in OPTIONS if keep is None or o.name in keep}
