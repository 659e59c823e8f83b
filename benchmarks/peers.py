"""FastV the way its reference repositories run it, for the scaling benchmark's peer comparison.

pkunlp-icler/FastV (src/FastV/llava-hf/transformers/.../modeling_llama.py, LlamaModel.forward with
fastv_config) and the toolkits that follow it run decoder layer K-1 with eager attention to get the
full attention matrix, rank the image tokens by the last query's attention averaged over heads,
keep the top ``keep`` in their original order with their original position ids, and run layers
K.. on the shorter sequence. Written here on a transformers LLaVA with the model's own modules
(no lmmsqueeze code), so that our one-query probe under sdpa can be timed against it on identical
inputs, with the kept sets compared.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def decoder_input(model: Any, inputs: dict) -> torch.Tensor:
    """The decoder's input: text embeddings with the projected image features in the image slots."""
    base = model.model
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    features = base.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    features = torch.cat(list(features), 0) if isinstance(features, (list, tuple)) else features
    slots = (inputs["input_ids"] == model.config.image_token_id)[..., None].expand_as(embeds)
    return embeds.masked_scatter(slots, features.to(embeds.dtype))


def _eager_layer(layer: Any, hidden: torch.Tensor, rope: tuple, cache: Any
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer with eager attention and a materialised causal mask; returns (hidden, weights)."""
    attn = layer.self_attn
    n = hidden.shape[1]
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
    mask = torch.triu(mask, 1)[None, None]
    backend = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        out, weights = attn(layer.input_layernorm(hidden), position_embeddings=rope, attention_mask=mask,
                            cache=cache)
    finally:
        attn.config._attn_implementation = backend
    hidden = hidden + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), weights


def fastv_reference(model: Any, inputs: dict, layer: int, keep: float, embeds: torch.Tensor | None = None,
                    eager_everywhere: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder prefill of one sample with FastV done the reference way (from ``embeds``, the
    :func:`decoder_input`, when given); returns (final hidden state of the last token, kept image-token
    indices in image order).

    By default only layer K-1 runs eager (the toolkits' way: a hook asks that one layer for its
    attention weights). ``eager_everywhere``: every layer does, as in FastV's own repository, whose
    transformers fork (``src/transformers/.../llama/modeling_llama.py``, ``LlamaAttention.forward``)
    has no other attention than ``softmax(q k^T / sqrt(d) + mask) v`` with a materialised causal mask.
    """
    lm = model.model.language_model
    hidden = decoder_input(model, inputs) if embeds is None else embeds
    n = hidden.shape[1]
    positions = torch.arange(n, device=hidden.device)[None]
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    kept, cache = None, DynamicCache(config=model.config.get_text_config())
    for i, block in enumerate(lm.layers):
        rope = lm.rotary_emb(hidden, positions)
        if i == layer - 1:
            hidden, weights = _eager_layer(block, hidden, rope, cache)
            scores = weights[0, :, -1, image].mean(0)  # the last query's attention, averaged over heads
            count = int(image.numel() * keep)
            kept = torch.sort(torch.topk(scores, count).indices).values
            slots = torch.ones(n, dtype=torch.bool, device=hidden.device)
            slots[image] = False
            slots[image[kept]] = True
            columns = torch.nonzero(slots).flatten()
            hidden, positions = hidden[:, columns], positions[:, columns]
        elif eager_everywhere:
            hidden, _ = _eager_layer(block, hidden, rope, cache)
        else:
            hidden = block(hidden, position_embeddings=rope, position_ids=positions, cache=cache,
                           use_cache=True)
    return lm.norm(hidden)[:, -1], kept
