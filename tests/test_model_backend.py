"""The Transformers backend on the real default model (SmolLM2-135M-Instruct GGUF).

Resampling reindexes the KV cache; after it, next-token logits must equal those recomputed
from scratch for the new prefixes (App. C). Likewise for rows that leave the batch (App. D).
"""

import pytest
import torch
from backend_checks import grow, sample_steps

from powersmc import smc_sample

pytestmark = pytest.mark.model
ATOL = 2e-4  # float32 cached vs uncached attention on CPU


def _from_scratch(lm, prefixes):
    with torch.inference_mode():
        out = []
        for ids in prefixes:
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            out.append(torch.log_softmax(logits, -1))
        return torch.stack(out)


def test_cached_logits_match_recompute(default_lm):
    prompt = default_lm.encode_prompt("Name a prime number.")
    _, seqs, logp = grow(default_lm, prompt, 5, 3)
    assert torch.allclose(logp, _from_scratch(default_lm, seqs), atol=ATOL)


@pytest.mark.parametrize("index", [[2, 2, 0, 3], [3, 1], [1, 0, 3, 2], [0, 0, 0, 0, 0, 0]])
def test_reorder_then_step_matches_recompute(default_lm, index):
    lm = default_lm
    prompt = lm.encode_prompt("Count to five.")
    state, seqs, _ = grow(lm, prompt, 4, 4, seed=1)
    lm.reorder(state, torch.tensor(index))
    seqs = [list(seqs[i]) for i in index]
    nxt = torch.arange(len(index)) + 100
    for s, t in zip(seqs, nxt.tolist(), strict=True):
        s.append(t)
    logp = lm.step(state, nxt)
    assert torch.allclose(logp, _from_scratch(lm, seqs), atol=ATOL)


def test_smc_on_default_model(default_lm):
    kw = dict(alpha=4.0, particles=6, max_new_tokens=24, seed=3, ess_threshold=0.9)
    r1 = smc_sample(default_lm, "What is 2 + 3?", **kw)
    r2 = smc_sample(default_lm, "What is 2 + 3?", **kw)
    assert r1.token_ids == r2.token_ids and r1.log_z == r2.log_z and r1.ess == r2.ess
    assert r1.text and len(r1.particles) == 6 and len(r1.ess) >= 1
    assert all(1.0 - 1e-9 <= e <= 6 + 1e-9 for e in r1.ess)
    assert r1.cost.token_evals <= 6 * 23 and r1.cost.prefill_tokens > 0
    for p in r1.particles:
        assert p.finished == (p.token_ids[-1] in default_lm.eos_token_ids)
        assert len(p.token_ids) <= 24


def test_several_prompts_left_padded_match_recompute(default_lm):
    """prefill_many: prompts of different lengths, left-padded in one cache. After steps, a
    reorder that mixes prompts and drops rows, and another step, every row's logits equal an
    unpadded from-scratch recompute of its own sequence."""
    lm = default_lm
    prompts = [lm.encode_prompt(t) for t in
               ("Hi.", "Name three prime numbers larger than ten and say why each is prime.")]
    assert len(prompts[0]) != len(prompts[1])
    state, logp = lm.prefill_many(prompts, 2)
    seqs = [list(p) for p in prompts for _ in range(2)]
    assert torch.allclose(logp, _from_scratch(lm, seqs), atol=ATOL)
    logp = sample_steps(lm, state, logp, seqs, 3, torch.Generator().manual_seed(4))
    assert torch.allclose(logp, _from_scratch(lm, seqs), atol=ATOL)
    index = [3, 0, 3]
    lm.reorder(state, torch.tensor(index))
    seqs = [list(seqs[i]) + [100 + k] for k, i in enumerate(index)]
    logp = lm.step(state, torch.tensor([100, 101, 102]))
    assert torch.allclose(logp, _from_scratch(lm, seqs), atol=ATOL)


def test_smc_many_prompts_on_default_model(default_lm):
    from powersmc import smc_sample_many

    prompts = ["What is 2 + 3?", "Write the word cat."]
    kw = dict(alpha=4.0, particles=4, max_new_tokens=12, seed=5)
    out = smc_sample_many(default_lm, prompts, **kw)
    assert len(out) == 2 and all(len(r.particles) == 4 for r in out)
    assert out[0].seed != out[1].seed  # each prompt's system has its own generator
    again = smc_sample_many(default_lm, prompts, **kw)
    assert [r.token_ids for r in again] == [r.token_ids for r in out]
