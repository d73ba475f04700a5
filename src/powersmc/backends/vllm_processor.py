"""The vLLM logits processor of the power proposal, and its side channel to the driver.

Per row, from the raw logits l of the next token (before any other processing), on the
device:

    log p     = l - logsumexp(l)                               (the model, full vocabulary)
    log p~    = log p truncated to top-k / top-p, renormalised  (only if the user asked: the
                target becomes the truncated model's power, as on the other backends)
    log Z_t   = logsumexp(alpha_t log p~)                      (eq. 11; under the default
                proposal tau = 1/alpha_t it IS the incremental weight, eq. 8 and Theorem 1)
    s         = log p~ / tau  [top-k / top-p of the proposal]  (the proposal's logits)
    log_norm  = logsumexp(s)                                   (log q(v) = s(v) - log_norm)

and it hands `s` to vLLM's sampler in place of l, so the request samples at temperature 1
from q; proposal temperature and alpha-ramping change per step through the spec the driver
updates between steps. The sampled token's raw log p comes back in vLLM's own output
(`logprobs_mode="raw_logprobs"`, computed from the logits before every processor); `shift` =
log p - log p~ on the kept tokens turns it into the target's. With `extra` > 0 the processor
also draws that many further tokens per row from q (for `ParticleEngine.redraw`, the fully
adapted order) with the group's own generator.

Side channel: the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the
processor and the driver share this module. A request carries `extra_args={"powersmc": [group,
request]}`; `GROUPS[group]` is the spec the driver set, and each `apply` leaves the rows'
values in `RESULTS[request]` (the latest apply wins: the driver reads them after every
engine step, whose one sampling pass that was).

Two processor interfaces exist in vLLM 0.32-0.33: the V1 model runner's (`update_state`
with batch index moves, `apply(logits)`; CPU, and GPU without Triton) and Model Runner V2's
(`add_request(slot, params)`, `apply(logits, ctx)`; the GPU default). `processor_class` picks
the one the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from powersmc.proposals import truncate_logprobs
from powersmc.weights import logsumexp_rows

KEY = "powersmc"


@dataclass
class Spec:
    """What the processor does to the rows of one group (one run), set by the driver.

    alpha: the exponent of log Z_t; inv_tau: the proposal's 1/tau (alpha_t by default);
    top_k / top_p: truncation of the target (the model); proposal_top_k / proposal_top_p:
    truncation of the tempered proposal only (Karan & Du's top-k 50, the server's plain
    sampling); extra: further independent draws from q per row; seed: their generator's."""

    alpha: float = 1.0
    inv_tau: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    proposal_top_k: int | None = None
    proposal_top_p: float | None = None
    extra: int = 0
    seed: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)


@dataclass
class RowResult:
    """What the processor computed for the row a request sampled its latest token from."""

    shift: float
    log_norm: float
    log_z: float
    extra_tokens: list[int] = field(default_factory=list)
    extra_logp: list[float] = field(default_factory=list)


GROUPS: dict[str, Spec] = {}
RESULTS: dict[str, tuple[torch.Tensor, int]] = {}  # request -> (stacked values, row)


def _truncated(logp: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    return truncate_logprobs(logp, top_k, top_p) if top_k is not None or (
        top_p is not None and top_p < 1.0) else logp


def power_rows(logits: torch.Tensor, spec: Spec) -> torch.Tensor:
    """Turn raw logits [b, V] (float32, modified in place) into the proposal's logits; return
    [b, 3 + 2 * extra] float64 values per row: shift, log_norm, log_z, then the extra tokens
    and their target log p."""
    lse = logsumexp_rows(logits)
    logp = logits.sub_(lse)  # raw log p, in place
    target = _truncated(logp, spec.top_k, spec.top_p)
    cut = spec.proposal_top_k is not None or (spec.proposal_top_p is not None
                                              and spec.proposal_top_p < 1.0)
    # the most likely token, kept by every truncation (an argmax costs as much as a
    # logsumexp over the vocabulary, so only where a truncation needs it)
    top = logp.argmax(-1, keepdim=True) if target is not logp or cut else None
    if top is None or target is logp:
        shift = torch.zeros_like(lse)
    else:
        shift = logp.gather(-1, top) - target.gather(-1, top)
    if target is logp and spec.inv_tau == spec.alpha and not cut:
        s = logp.mul_(spec.alpha)  # the default proposal q = p^alpha_t / Z_t: one reduction
        log_z = log_norm = logsumexp_rows(s)
    else:
        log_z = logsumexp_rows(target * spec.alpha)
        s = target * spec.inv_tau
        if cut and top is not None:  # q over the kept set; log_norm = logsumexp over it
            q = truncate_logprobs(torch.log_softmax(s, -1), spec.proposal_top_k,
                                  spec.proposal_top_p)
            log_norm = s.gather(-1, top) - q.gather(-1, top)
            s = q
        else:
            log_norm = logsumexp_rows(s)
    out = [shift, log_norm, log_z]
    if spec.extra:
        if spec.generator is None or spec.generator.device != logits.device:
            spec.generator = torch.Generator(device=logits.device).manual_seed(spec.seed)
        extra = torch.multinomial(torch.softmax(s, -1), spec.extra, replacement=True,
                                  generator=spec.generator)
        out += [extra.to(torch.float64), target.gather(-1, extra)]
    if s is not logits:
        logits.copy_(s)
    return torch.cat([v.double() for v in out], -1)


def apply_rows(logits: torch.Tensor, rows: list[tuple[str, str] | None]) -> torch.Tensor:
    """Process every row that belongs to a group (`rows[i]` = (group, request) or None), group
    by group, and publish each request's values in RESULTS."""
    by_group: dict[str, list[tuple[int, str]]] = {}  # group -> its (row, request) pairs
    for i, key in enumerate(rows):
        if key is not None and key[0] in GROUPS:
            by_group.setdefault(key[0], []).append((i, key[1]))
    for group, members in by_group.items():
        spec = GROUPS[group]
        idx = [i for i, _ in members]
        if len(idx) == logits.shape[0]:
            values = power_rows(logits, spec)
        else:
            index = torch.tensor(idx, device=logits.device)
            part = logits.index_select(0, index)
            values = power_rows(part, spec)
            logits.index_copy_(0, index, part)
        for j, (_, request) in enumerate(members):
            RESULTS[request] = (values, j)
    return logits


def take(requests: list[str]) -> dict[str, RowResult]:
    """The latest values the processor left for each request (one host transfer per apply),
    forgotten once read. A request missing here produced a token no apply saw: an engine
    configuration this module does not support."""
    rows: dict[int, list[list[float]]] = {}
    out = {}
    for r in requests:
        values, j = RESULTS.pop(r)
        if id(values) not in rows:
            rows[id(values)] = values.cpu().tolist()
        v = rows[id(values)][j]
        k = (len(v) - 3) // 2
        out[r] = RowResult(v[0], v[1], v[2], [int(x) for x in v[3 : 3 + k]], v[3 + k :])
    return out


def _key(params: Any) -> tuple[str, str] | None:
    extra = getattr(params, "extra_args", None) or {}
    key = extra.get(KEY)
    return None if key is None else (str(key[0]), str(key[1]))


def processor_class(v2: bool) -> type:
    """The processor class for the engine's model runner (V2 if `v2`), built on first use so
    that importing this module never imports vLLM."""
    return _v2_class() if v2 else _v1_class()


def _v1_class() -> type:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class PowerProcessorV1(LogitsProcessor):
        """V1 model runner: rows are persistent-batch indices, moved by `update_state`."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
            self.rows: dict[int, tuple[str, str]] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # applied to greedy rows too: every row's values are published

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for i in batch_update.removed:
                self.rows.pop(i, None)
            for i, params, _, _ in batch_update.added:
                key = _key(params)
                if key is None:
                    self.rows.pop(i, None)
                else:
                    self.rows[i] = key
            for a, b, how in batch_update.moved:
                ka, kb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ka is not None:
                    self.rows[b] = ka
                if how == MoveDirectionality.SWAP and kb is not None:
                    self.rows[a] = kb

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            return apply_rows(logits, [self.rows.get(i) for i in range(logits.shape[0])])

    return PowerProcessorV1


def _v2_class() -> type:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

    class PowerProcessorV2(LogitsProcessor):
        """Model Runner V2: rows map to request slots through `ctx.idx_mapping_np`."""

        def __init__(self, vllm_config: Any, req_states: Any):
            self.slots: dict[int, tuple[str, str] | None] = {}

        def add_request(self, req_idx: int, sampling_params: Any) -> bool:
            self.slots[req_idx] = _key(sampling_params)
            return self.slots[req_idx] is not None

        def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
            slots = ctx.idx_mapping_np.tolist()
            if len(slots) != logits.shape[0]:
                raise RuntimeError("the power-proposal processor needs one logits row per "
                                   "request (no speculative decoding)")
            return apply_rows(logits, [self.slots.get(s) for s in slots])

    return PowerProcessorV2
