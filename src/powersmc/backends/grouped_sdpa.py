"""The static cache's attention (`backends.transformers_static`): SDPA on the key/value heads
for one query token, registered with Transformers under its own name, and which models it
serves."""

from __future__ import annotations

from typing import Any

import torch

ATTENTION = "powersmc_sdpa"


def _grouped_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA attention that, for one query token with a mask, runs on the key/value heads.

    Transformers' SDPA path repeats each key/value head for its query heads whenever a mask is
    given (`repeat_kv`: for Qwen2.5-7B, 7 copies of the whole cache per layer and step). For a
    single query token the same attention is computed without copies by folding the g = H_q /
    H_kv query heads of a group into the query-length axis: query head i*g + j attends with
    key/value head i, and the [rows, 1, 1, L] mask is shared by all of them. Everything else
    (prefill, no mask) goes to Transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q, d = query.shape
    hkv = key.shape[1]
    if (q != 1 or attention_mask is None or hq == hkv or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, hkv, hq // hkv, d), key, value, attn_mask=attention_mask,
        scale=scaling)
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _grouped_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def static_applies(model: Any) -> str | None:
    """Why the static cache cannot serve `model` (None: it can). It needs SDPA attention and
    full attention in every layer (no sliding windows: a slot is never dropped)."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if cfg._attn_implementation not in ("sdpa", ATTENTION):
        return f"attention {cfg._attn_implementation!r} (needs sdpa)"
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"layer types {sorted(types)} (needs full attention in every layer)"
    return None
