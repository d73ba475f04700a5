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
from powersmc.methods.decoding import sample
from powersmc.methods.mh import mh_sample
from powersmc.methods.smc import smc_sample
from powersmc.methods.spower import scalable_power_sample
from powersmc.results import SampleResult


def _plain(model, prompt, *, alpha, **kw):
    return sample(model, prompt, temperature=1.0, **kw)


def _lowtemp(model, prompt, *, alpha, **kw):
    return sample(model, prompt, temperature=1.0 / alpha, **kw)


def _greedy(model, prompt, *, alpha, **kw):
    return sample(model, prompt, greedy=True, **kw)


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
}
_TARGETS = {"plain": sample, "lowtemp": sample, "greedy": sample, "mh-faithful": mh_sample}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise InputError("method", f"one of {', '.join(METHODS)}", name)
    return name


def run_method(name: str, model: LanguageModel, prompt: Prompt, *, alpha: float,
               max_new_tokens: int, seed: int | None, **options: Any) -> SampleResult:
    """Run method `name` with the shared arguments and whichever `options` it accepts."""
    fn = METHODS[check_method(name)]
    accepted = inspect.signature(_TARGETS.get(name, fn)).parameters
    kw = {k: v for k, v in options.items() if k in accepted and v is not None}
    if name in _TARGETS:  # the wrapper sets these itself
        for fixed in ("temperature", "greedy", "mode"):
            kw.pop(fixed, None)
    return fn(model, prompt, alpha=alpha, max_new_tokens=max_new_tokens, seed=seed, **kw)
