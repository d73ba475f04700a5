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
from powersmc.methods.smc import smc_sample

# Qwen2.5-7B (Qwen/Qwen2.5-7B config.json), the architecture of the paper's GPU runs
QWEN25_7B = {
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
    times: dict[str, list[float]] = {"smc": [], "vllm_n": [], "vllm_1": []}
    resamples = []
    for r in range(repeats + 1):
        t_smc, res = _timed(lm.device, smc_sample, NoEOS(lm), ids, alpha=alpha,
                            particles=particles, max_new_tokens=tokens, seed=r)
        t_n, _ = _timed(lm.device, vllm_sampling, lm, ids, particles, tokens, alpha, r)
        t_1, _ = _timed(lm.device, vllm_sampling, lm, ids, 1, tokens, alpha, r)
        if r == 0:
            continue  # warm-up round
        for k, v in (("smc", t_smc), ("vllm_n", t_n), ("vllm_1", t_1)):
            times[k].append(v)
        resamples.append(len(res.resample_steps))
    ratio_n = [a / b for a, b in zip(times["smc"], times["vllm_n"], strict=True)]
    ratio_1 = [a / b for a, b in zip(times["smc"], times["vllm_1"], strict=True)]
    return {"particles": particles, "tokens": tokens, "alpha": alpha,
            "seconds": {k: _spread(v) for k, v in times.items()},
            "smc_over_vllm_n": _spread(ratio_n), "smc_over_vllm_1": _spread(ratio_1),
            "smc_step_ms": 1e3 * statistics.median(times["smc"]) / tokens,
            "resamples_per_run": statistics.mean(resamples)}


def markdown(r: dict[str, Any]) -> str:
    s, n, o = r["seconds"], r["smc_over_vllm_n"], r["smc_over_vllm_1"]
    return "\n".join([
        f"## Power-SMC on vLLM: N = {r['particles']}, T = {r['tokens']}, "
        f"alpha = {r['alpha']}", "",
        "| run | seconds (median, IQR) |", "|---|---|",
        *(f"| {k} | {v['median']:.3f} ({v['q1']:.3f}-{v['q3']:.3f}) |" for k, v in s.items()),
        "",
        f"* SMC / vLLM n = {r['particles']} sampling: median **{n['median']:.3f}** "
        f"(IQR {n['q1']:.3f}-{n['q3']:.3f}; target <= 1.10)",
        f"* SMC / vLLM single-sequence decoding: median **{o['median']:.3f}** "
        f"(IQR {o['q1']:.3f}-{o['q3']:.3f}; GPU target <= 1.25)",
        f"* {r['smc_step_ms']:.1f} ms per SMC step; {r['resamples_per_run']:.1f} resamples "
        "per run", ""])
