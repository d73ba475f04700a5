"""One entry point for every method, used by the CLI, the evaluation harness and the server.

`method_program(name, model, prompt, alpha=..., max_new_tokens=..., seed=..., **options)` maps
the shared names onto each method's program (`methods.program`), to start on any `Scheduler`
(`runtime.api.run_method` runs one alone). `options` holds method-specific settings, and
those a method does not take are ignored, so one option set can drive a whole comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.bon import bon_program
from powersmc.methods.common import check_positive_int
from powersmc.methods.decoding import decode_program
from powersmc.methods.mh import mh_program
from powersmc.methods.options import BY_NAME, taken_by
from powersmc.methods.ppt import ppt_program
from powersmc.methods.program import Program
from powersmc.methods.resample_move import smc_rm_program
from powersmc.methods.smc import smc_program
from powersmc.methods.spower import spower_program


def _plain(model, prompt, *, alpha, **kw):
    """Plain sampling at `temperature` (default 1; 0 is greedy, as OpenAI's)."""
    if kw.get("temperature") == 0:
        kw = {**kw, "temperature": 1.0, "greedy": True}
    return decode_program(model, prompt, **kw)


def _lowtemp(model, prompt, *, alpha, **kw):
    return decode_program(model, prompt, temperature=1.0 / alpha, **kw)


def _greedy(model, prompt, *, alpha, **kw):
    return decode_program(model, prompt, greedy=True, **kw)


def _bon(model, prompt, *, alpha, max_new_tokens, seed, particles: int = 16,
         bon_samples: int | None = None, select: str = "sample", key=None):
    """Best-of-N with N = bon_samples, by default the SMC particle count (equal token-evals)."""
    n = particles if bon_samples is None else check_positive_int("bon_samples", bon_samples)
    return bon_program(model, prompt, alpha=alpha, num_samples=n,
                       max_new_tokens=max_new_tokens, seed=seed, select=select, key=key)


def _maj(model, prompt, *, alpha, max_new_tokens, seed, particles: int = 16,
         maj_samples: int | None = None, temperature: float = 1.0, key=None):
    """Self-consistency: N = maj_samples samples (default: the SMC particle count, so equal
    token-evals) at `temperature`, the answer most of them give (pooled by `key`)."""
    n = particles if maj_samples is None else check_positive_int("maj_samples", maj_samples)
    return decode_program(model, prompt, temperature=temperature,
                          num_samples=n, max_new_tokens=max_new_tokens,
                          seed=seed, select="majority", key=key)


def _ccps(model, prompt, **kw):
    """CCPS (arXiv 2609.12243): Power-SMC with chopthin resampling, whose unequal weights are
    carried forward, and the consensus selector. Their other settings are the user's: N = 32,
    alpha = 2, a ramp over 100 tokens (`ramp_tokens=100`), the ESS checked every 64 tokens
    (`resample_align=64`)."""
    return smc_program(model, prompt, **{**kw, "resampler": "chopthin", "select": "consensus"})


def _ecmh(model, prompt, **kw):
    """Entropy-cut MH (arXiv 2605.30327), exact: `mh` with the entropy cut law."""
    return mh_program(model, prompt, **{"cut_power": 4.0, **kw, "mode": "exact"})


def _ecmh_faithful(model, prompt, **kw):
    """Entropy-cut MH with the published code's variable-length scoring (biased with EOS)."""
    return mh_program(model, prompt, **{"cut_power": 4.0, **kw, "mode": "faithful"})


def _smc_adapted(model, prompt, **kw):
    """Power-SMC in the fully adapted order (`order='adapted'`), so one evaluation can run
    both orders side by side on the same problems and seeds."""
    return smc_program(model, prompt, **{**kw, "order": "adapted"})


def _mh_faithful(model, prompt, **kw):
    return mh_program(model, prompt, **{**kw, "mode": "faithful"})


METHODS: dict[str, Callable[..., Program]] = {
    "plain": _plain,
    "lowtemp": _lowtemp,
    "greedy": _greedy,
    "mh": mh_program,
    "mh-faithful": _mh_faithful,
    "spower": spower_program,
    "smc": smc_program,
    "smc-adapted": _smc_adapted,
    "bon": _bon,
    "maj": _maj,
    "smc-rm": smc_rm_program,
    "ccps": _ccps,
    "ppt": ppt_program,
    "ecmh": _ecmh,
    "ecmh-faithful": _ecmh_faithful,
}
DECODING = ("plain", "lowtemp", "greedy")
"""Methods whose result holds `num_samples` answers (`SampleResult.samples`)."""

_SMC_EXTRA = ("alpha_schedule", "tau", "proposal", "top_k", "top_p", "key")
_EXTRA: dict[str, tuple[str, ...]] = {
    "smc": _SMC_EXTRA, "smc-adapted": _SMC_EXTRA, "bon": ("key",), "mh": ("mode",),
    "mh-faithful": (), "spower": ("jackknife",), "maj": ("key",), "smc-rm": ("key",),
    "ccps": ("alpha_schedule", "key"), "ppt": (), "ecmh": (), "ecmh-faithful": (),
    "plain": ("temperature", "top_k", "top_p", "num_samples"),
    "lowtemp": ("num_samples",), "greedy": ("num_samples",)}
"""Keyword arguments a method takes beyond its declared options (`methods.options`): the
library's own (callables, selection keys) and the decoding controls."""


def check_method(name: str) -> str:
    if name not in METHODS:
        raise InputError("method", f"one of {', '.join(METHODS)}", name)
    return name


def check_select_for(methods: list[str], select: str | None) -> None:
    """A `select` other than 'sample' needs a method with several answers among `methods`."""
    if select in (None, "sample"):
        return
    several = BY_NAME["select"].methods
    if not any(m in several for m in methods):
        raise InputError("select", f"'sample' for {', '.join(methods)} (one answer each); "
                         f"{select!r} chooses among the answers of {', '.join(several)}",
                         select)


def method_program(name: str, model: LanguageModel, prompt: Prompt, *, alpha: float,
                   max_new_tokens: int, seed: int | None, **options: Any) -> Program:
    """Method `name`'s program with the shared arguments and whichever `options` it takes."""
    fn = METHODS[check_method(name)]
    kw = _accepted(name, options)
    return fn(model, prompt, alpha=alpha, max_new_tokens=max_new_tokens, seed=seed, **kw)


def _accepted(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options method `name` takes (None means: use the method's default)."""
    accepted = {o.name for o in taken_by(name)} | set(_EXTRA[name])
    return {k: v for k, v in options.items() if k in accepted and v is not None}
