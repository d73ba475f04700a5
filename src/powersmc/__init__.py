"""powersmc: sample whole answers from the power distribution pi_alpha(y|x) ~ p(y|x)^alpha.

Power-SMC (Azizi et al.) and the baselines it is compared with, over any causal LM.
"""

from powersmc.backends.function_lm import FunctionLM
from powersmc.backends.protocol import LanguageModel
from powersmc.errors import DegenerateWeightsError, InputError
from powersmc.methods.bon import bon_sample
from powersmc.methods.decoding import sample
from powersmc.methods.mh import mh_sample
from powersmc.methods.scheduler import Cancelled, Handle, Scheduler
from powersmc.methods.smc import smc_sample, smc_sample_many
from powersmc.methods.spower import scalable_power_sample
from powersmc.models import load_model
from powersmc.proposals import TemperatureProposal, TruncatedTargetWarning
from powersmc.results import ImportanceResult, Particle, SampleResult, SMCResult

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
