"""powersmc: sample whole answers from the power distribution pi_alpha(y|x) ~ p(y|x)^alpha.

Power-SMC (Azizi et al.) and the baselines it is compared with, over any causal LM.
"""

from powersmc.backends.function_lm import FunctionLM
from powersmc.backends.protocol import LanguageModel
from powersmc.errors import DegenerateWeightsError, InputError
from powersmc.models import load_model
from powersmc.proposals import TemperatureProposal, TruncatedTargetWarning
from powersmc.results import ImportanceResult, Particle, SampleResult, SMCResult
from powersmc.runtime.api import (
    bon_sample,
    mh_sample,
    sample,
    scalable_power_sample,
    smc_sample,
    smc_sample_many,
)
from powersmc.runtime.scheduler import Cancelled, Handle, Scheduler

__all__ = [
    "Cancelled",
    "DegenerateWeightsError",
    "Handle",
    "Scheduler",
    "FunctionLM",
    "ImportanceResult",
    "InputError",
    "LanguageModel",
    "Particle",
    "SMCResult",
    "SampleResult",
    "TemperatureProposal",
    "TruncatedTargetWarning",
    "bon_sample",
    "load_model",
    "mh_sample",
    "sample",
    "scalable_power_sample",
    "smc_sample",
    "smc_sample_many",
]
__version__ = "0.1.0"
