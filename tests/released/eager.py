"""What the released code reads, taken from a transformers LLaVA run in eager mode.

Released token-reduction code reads attention maps (``output_attentions=True``), hidden states
(``output_hidden_states=True``) and projections caught by forward hooks, and drives the decoder
loop layer by layer. These helpers do the same on a ``LlavaForConditionalGeneration`` whose
attention implementation is ``eager``; nothing here imports lmmsqueeze.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class VisionRun:
    """One eager pass of the CLIP tower on one image."""

    hidden_states: tuple[Tensor, ...]  # embeddings, then the output of every layer: [1, 1 + N, C]
    attentions: tuple[Tensor, ...]  # every layer's attention probabilities: [1, H, 1 + N, 1 + N]
    q: dict[int, Tensor]  # layer -> q_proj output [1, 1 + N, C] (hooked, as PruMerge does)
    k: dict[int, Tensor]  # layer -> k_proj output [1, 1 + N, C]


def vision_run(model: nn.Module, pixel_values: Tensor, hooked: tuple[int, ...] = ()) -> VisionRun:
    """Run the vision tower with ``output_attentions`` and ``output_hidden_states`` and hooks on the
    ``q_proj``/``k_proj`` of the ``hooked`` layers."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    q: dict[int, Tensor] = {}
    k: dict[int, Tensor] = {}
    handles = []
    for i in hooked:
        attn = layers[i].self_attn
        handles.append(attn.q_proj.register_forward_hook(lambda m, a, o, i=i: q.__setitem__(i, o)))
        handles.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: k.__setitem__(i, o)))
    try:
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return VisionRun(out.hidden_states, out.attentions, q, k)


def image_span(input_ids: Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, length) of the single run of image placeholders in a one-sample prompt."""
    where = torch.nonzero(input_ids[0] == image_token_id).flatten()
    start, length = int(where[0]), int(where.numel())
    assert int(where[-1]) == start + length - 1, "one contiguous image run expected"
    return start, length


def llm_inputs(model: nn.Module, inputs: dict) -> Tensor:
    """``[1, L, D]`` the decoder's input embeddings for a prompt (image features in place)."""
    caught = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return caught["embeds"]


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[1, 1, L, L]`` additive causal mask, as an eager decoder layer takes it."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


@dataclass
class LayerRun:
    """A decoder layer's output, its attention probabilities and the keys it cached (post-RoPE)."""

    hidden: Tensor  # [1, L, D]
    attention: Tensor  # [1, H, L, L]
    keys: Tensor  # [1, H_kv, L, head_dim]


def run_layer(model: nn.Module, index: int, hidden: Tensor, position_ids: Tensor) -> LayerRun:
    """Run decoder layer ``index`` eagerly on ``hidden`` with RoPE at ``position_ids`` (``[1, L]``)
    and a causal mask, as a released decoder loop does."""
    lm = model.model.language_model
    layer = lm.layers[index]
    cos, sin = lm.rotary_emb(hidden, position_ids)
    caught = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        caught["attention"] = output[1]

    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    handle = layer.self_attn.register_forward_hook(grab, with_kwargs=True)
    try:
        out = layer(hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype, hidden.device),
                    position_embeddings=(cos, sin), position_ids=position_ids, cache=cache, use_cache=True)
    finally:
        handle.remove()
    return LayerRun(out, caught["attention"], cache.layers[index].keys)


def logits_of(model: nn.Module, hidden: Tensor) -> Tensor:
    """The LM head's logits for the last decoder layer's output."""
    return model.lm_head(model.model.language_model.norm(hidden))
