"""Tiny random Transformers models (built with `from_config`, nothing downloaded) for the
static-cache tests: a Llama and a Qwen2 configuration with grouped-query attention."""

from __future__ import annotations

import torch

from powersmc import FunctionLM
from powersmc.backends.transformers_lm import TransformersLM

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ids t0 .. t{vocab-1}; t0 is EOS (prompts are token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", unk_token="t0")


def tiny_model(kind: str, vocab: int = 64, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A random `kind` ('llama' or 'qwen2') causal LM with SDPA attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    config = cls(vocab_size=vocab, **SIZES)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def tiny_lm(kind: str, cache: str, vocab: int = 64, dtype: torch.dtype = torch.float64,
            seed: int = 0, **kw) -> TransformersLM:
    """`TransformersLM` over a fresh tiny model (its own copy: the static cache switches the
    model's attention function)."""
    return TransformersLM(tiny_model(kind, vocab, dtype, seed), word_tokenizer(vocab),
                          chat=False, cache=cache, **kw)


def from_scratch(model, prefixes) -> torch.Tensor:
    """Next-token log-probs of each prefix by one uncached, unpadded forward (float32)."""
    with torch.inference_mode():
        return torch.stack([
            torch.log_softmax(model(input_ids=torch.tensor([list(p)])).logits[0, -1].float(), -1)
            for p in prefixes])


def as_function_lm(lm: TransformersLM) -> FunctionLM:
    """The same model as a `FunctionLM` (every prefix from scratch), for `powersmc.exact`'s
    enumeration of pi_alpha."""
    model = lm.model
    return FunctionLM(lambda prefix: from_scratch(model, [prefix])[0].double(),
                      lm.vocab_size, lm.eos_token_ids)
