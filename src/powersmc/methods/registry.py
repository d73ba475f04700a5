"""One entry point for every method, used by the CLI and the evaluation harness.

`run_method(name, model, prompt, alpha=..., max_new_tokens=..., seed=..., **options)` maps the
shared names onto each sampler; `options` holds method-specific settings, and those a method
does not take are ignored, so one option set can drive a whole comparison.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from powersmc.backends.protocol import LanguageModel, Prompt
from powersmc.errors import InputError
from powersmc.methods.bon import bon_sample
from powersmc.methods.decoding import sample
from powersmc.methods.mh import mh_sample
from powersmc.methods.smc import smc_sample, smc_sample_many
from powersmc.methods.spower import scalable_power_sample
from powersmc.results import SampleResult


def _plain(model, prompt, *, alpha, **kw):
    return sample(model, prompt, temperature=1.0, **kw)


def _lowtemp(model, prompt, *, alpha, **kw):
    return sample(model, prompt, temperature=1.0 / alpha, **kw)


def _greedy(model, prompt, *, alpha, **kw):
    return sample(model, prompt, greedy=True, **kw)


def _bon(model, prompt, *, alpha, max_new_tokens, seed, particles: int = 16,
         bon_samples: int | None = None, select: str = "sample", key=None):
    """Best-of-N with N = bon_samples, by default the SMC particle count (equal token-evals)."""
    return bon_sample(model, prompt, alpha=alpha, num_samples=bon_samples or particles,
                      max_new_tokens=max_new_tokens, seed=seed, select=select, key=key)


def _smc_adapted(model, prompt, **kw):
    """Power-SMC in the fully adapted order (`order='adapted'`), so one evaluation can run
    both orders side by side on the same problems and seeds."""
    return smc_sample(model, prompt, **{**kw, "order": "adapted"})


def _mh_faithful(model, prompt, **kw):
    return mh_sample(model, prompt, **{**kw, "mode": "faithful"})


METHODS: dict[str, Callable[..., SampleResult]] = {
    "plain": _plain,
    "lowtemp": _lowtemp,
    "greedy": _greedy,
    "mh": mh_sample,
    "mh-faithful": _mh_faithful,
    "spower": scalable_power_sample,
    "smc": smc_sample,
    "smc-adapted": _smc_adapted,
    "bon": _bon,
}
# Where each method's keyword arguments are declared, when its entry point only forwards them.
_TARGETS: dict[str, Callable[..., Any]] = {
    "plain": sample, "lowtemp": sample, "greedy": sample, "mh-faithful": mh_sample,
    "smc": smc_sample_many, "smc-adapted": smc_sample_many}
_DECODING = ("temperature", "greedy")
_FIXED = {"plain": _DECODING, "lowtemp": _DECODING, "greedy": _DECODING,  # set by the wrappers
          "mh-faithful": ("mode",), "smc-adapted": ("order",)}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise InputError("method", f"one of {', '.join(METHODS)}", name)
    return name


def run_method(name: str, model: LanguageModel, prompt: Prompt, *, alpha: float,
               max_new_tokens: int, seed: int | None, **options: Any) -> SampleResult:
    """Run method `name` with the shared arguments and whichever `options` it accepts."""
    fn = METHODS[check_method(name)]
    kw = _accepted(name, options)
    return fn(model, prompt, alpha=alpha, max_new_tokens=max_new_tokens, seed=seed, **kw)


def smc_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options Power-SMC takes, for `Scheduler.submit` (same filtering as `run_method`)."""
    return {k: v for k, v in _accepted("smc", options).items() if k != "progress"}


def _accepted(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options method `name` takes (None means: use the method's default)."""
    accepted = inspect.signature(_TARGETS.get(name, METHODS[name])).parameters
    return {k: v for k, v in options.items()
            if k in accepted and v is not None and k not in _FIXED.get(name, ())}
