"""Result objects shared by every sampler, with JSON-ready dictionaries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Cost:
    """What a run spent. A token evaluation is one cached forward step producing next-token
    logits for one sequence (paper Sec. 6.1); the prompt's prefill is counted separately.
    `queue_seconds`: time a scheduled run waited for rows before it joined the batch (not
    part of `seconds`)."""

    seconds: float = 0.0
    forward_passes: int = 0
    token_evals: int = 0
    prefill_tokens: int = 0
    queue_seconds: float = 0.0

    def add_step(self, rows: int) -> None:
        self.forward_passes += 1
        self.token_evals += rows

    def add_prefill(self, prompt_len: int) -> None:
        self.forward_passes += 1
        self.prefill_tokens += prompt_len


@dataclass
class Particle:
    """One particle (or importance sample) at the end of a run. `log_weight` is unnormalised:
    the normalised weights are the softmax over the result's particles (with rounds > 1 it
    includes the particle's round evidence, log Z_hat_r + log W_r^i)."""

    token_ids: list[int]
    text: str
    log_weight: float
    finished: bool


@dataclass
class SampleResult:
    """Output of any sampler: the chosen answer plus cost accounting.

    For plain / low-temperature / greedy decoding with num_samples > 1, `samples` holds all
    token-id lists and `texts` their decoded texts; `token_ids` / `text` are the first.
    """

    method: str
    text: str
    token_ids: list[int]
    seed: int
    cost: Cost = field(default_factory=Cost)  # a program's is the scheduler's accounting
    finished: bool = True
    samples: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.cost.seconds

    @property
    def forward_passes(self) -> int:
        return self.cost.forward_passes

    @property
    def token_evals(self) -> int:
        return self.cost.token_evals

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SMCResult(SampleResult):
    """Power-SMC output (Algorithm 1): the drawn answer, every particle, and diagnostics.

    ess: ESS after each token (eq. 6), before any resampling at that step.
    resample_steps: token indices t (1-based) after which resampling fired.
    log_z: SMC estimate of log sum_y p(y)^alpha (its exp is unbiased for the normalizer).
    log_z_t: per step, the mean over live particles of log Z_t(alpha_t) = (1 - alpha_t) H_alpha
        (eq. 13); the incremental log-weight under the tempered proposal.
    """

    particles: list[Particle] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    resample_steps: list[int] = field(default_factory=list)
    log_z: float = 0.0
    log_z_t: list[float] = field(default_factory=list)
    alpha: float = 1.0
    num_particles: int = 1


@dataclass
class ImportanceResult(SampleResult):
    """Importance-resampled best-of-N output: N plain samples weighted for pi_alpha.

    particles: every sample with log-weight (alpha - 1) log p(y) (eq. 4 with q = p);
    log_z: log((1/N) sum_i p(y_i)^(alpha - 1)), whose exp is unbiased for sum_y p(y)^alpha;
    ess: the effective sample size of the weights (eq. 6).
    """

    particles: list[Particle] = field(default_factory=list)
    log_z: float = 0.0
    ess: float = 0.0
    alpha: float = 1.0
    num_particles: int = 1
