"""Power-SMC on vLLM against vLLM's own sampling, side by side (issue 10's targets).

* `smc_vs_vllm`: Power-SMC (N particles, T forced tokens: EOS disabled, as in `bench`) against
  vLLM sampling N sequences of T tokens itself (one request, `n = N`, temperature 1/alpha,
  `ignore_eos`) and against single-sequence decoding (`n = 1`), alternating rounds, medians.
  Targets: SMC / (n = N) <= 1.10; on a GPU SMC / (n = 1) <= 1.25.
* `qwen_dummy_dir`: a directory with Qwen2.5-7B's configuration and a synthetic word-level
  tokenizer covering its vocabulary, for `load_format="dummy"` (random weights: timing only,
  nothing downloaded); prompts are then token ids.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from powersmc.bench import NoEOS, _spread, _timed
from powersmc.runtime.api import smc_sample

# Qwen2.5-7B (Qwen/Qwen2.5-7B config.json), the architecture of the paper's GPU runs
QWEN25_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
    "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
    "vocab_size": 152064, "bos_token_id": 151643, "eos_token_id": 151643,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "torch_dtype": "bfloat16",
}


def qwen_dummy_dir(path: str | Path) -> Path:
    """Write Qwen2.5-7B's config.json and a word-level tokenizer of its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(QWEN25_7B, indent=2))
    vocab = {f"t{i}": i for i in range(QWEN25_7B["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t151643",
                            unk_token="t0").save_pretrained(str(out))
    return out


def vllm_sampling(lm: Any, prompt_ids: list[int], n: int, tokens: int, alpha: float,
                  seed: int) -> int:
    """vLLM's own sampling of `n` sequences of `tokens` tokens at temperature 1/alpha (one
    request; no processor work, full vocabulary); returns the tokens produced."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(n=n, temperature=1.0 / alpha, top_p=1.0, top_k=0, min_p=0.0,
                            seed=seed, max_tokens=tokens, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    rid = f"bench-{seed}-{n}"
    lm.engine.add_request(rid, TokensPrompt(prompt_token_ids=list(prompt_ids)), params)
    produced = 0
    while lm.engine.has_unfinished_requests():
        for out in lm.engine.step():
            produced += sum(len(c.token_ids) for c in out.outputs)
    return produced


def smc_vs_vllm(lm: Any, prompt: str | list[int], *, particles: int, tokens: int,
                alpha: float, repeats: int) -> dict[str, Any]:
    """Seconds of Power-SMC, of vLLM sampling `particles` sequences and of one sequence, all
    T forced tokens, alternating, `repeats` rounds after a warm-up round."""
    ids = lm.encode_prompt(prompt)
    smc_runs = {"smc": {}, "smc_block": {"resample_align": "block"}}
    times: dict[str, list[float]] = {k: [] for k in (*smc_runs, "vllm_n", "vllm_1")}
    resamples: dict[str, list[int]] = {k: [] for k in smc_runs}
    ess: dict[str, list[float]] = {k: [] for k in smc_runs}
    for r in range(repeats + 1):
        for k, opts in smc_runs.items():
            t_smc, res = _timed(lm.device, smc_sample, NoEOS(lm), ids, alpha=alpha,
                                particles=particles, max_new_tokens=tokens, seed=r, **opts)
            if r:
                times[k].append(t_smc)
                resamples[k].append(len(res.resample_steps))
                ess[k].append(statistics.fmean(res.ess) / particles)
        t_n, _ = _timed(lm.device, vllm_sampling, lm, ids, particles, tokens, alpha, r)
        t_1, _ = _timed(lm.device, vllm_sampling, lm, ids, 1, tokens, alpha, r)
        if r == 0:
            continue  # warm-up round
        times["vllm_n"].append(t_n)
        times["vllm_1"].append(t_1)
    out = {"particles": particles, "tokens": tokens, "alpha": alpha,
           "seconds": {k: _spread(v) for k, v in times.items()}}
    for k in smc_runs:
        out[k] = {
            "over_vllm_n": _spread([a / b for a, b in zip(times[k], times["vllm_n"],
                                                          strict=True)]),
            "over_vllm_1": _spread([a / b for a, b in zip(times[k], times["vllm_1"],
                                                          strict=True)]),
            "step_ms": 1e3 * statistics.median(times[k]) / tokens,
            "resamples_per_run": statistics.fmean(resamples[k]),
            "mean_ess_fraction": statistics.fmean(ess[k])}
    return out


def markdown(r: dict[str, Any]) -> str:
    s = r["seconds"]

    def iqr(v: dict[str, float]) -> str:
        return f"**{v['median']:.3f}** ({v['q1']:.3f}-{v['q3']:.3f})"

    rows = [f"| {k} | {iqr(r[k]['over_vllm_n'])} | {iqr(r[k]['over_vllm_1'])} | "
            f"{r[k]['step_ms']:.1f} | {r[k]['resamples_per_run']:.1f} | "
            f"{r[k]['mean_ess_fraction']:.2f} |" for k in ("smc", "smc_block")]
    return "\n".join([
        f"## Power-SMC on vLLM: N = {r['particles']}, T = {r['tokens']}, "
        f"alpha = {r['alpha']}", "",
        "| run | seconds (median, IQR) |", "|---|---|",
        *(f"| {k} | {v['median']:.3f} ({v['q1']:.3f}-{v['q3']:.3f}) |" for k, v in s.items()),
        "",
        f"| SMC | / vLLM n = {r['particles']} (target <= 1.10) | / vLLM n = 1 (GPU target "
        "<= 1.25) | ms per step | resamples per run | mean ESS / N |",
        "|---|---|---|---|---|---|", *rows, "",
        "smc: Algorithm 1's schedule (resample as soon as ESS < N/2); smc_block: "
        "`resample_align='block'` (the same rule, resampling deferred to KV-block "
        "boundaries, where copies need no recomputation). Medians of per-round ratios, IQR.",
        ""])
