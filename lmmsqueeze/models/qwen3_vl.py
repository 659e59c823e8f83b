"""Qwen3-VL: ``Qwen3VLForConditionalGeneration``.

Qwen2-VL's layout (a patch merger makes each 2x2 unit of patches one LLM token, positions are 3-D
M-RoPE ids, here with interleaved sections) plus **DeepStack**: features of chosen vision blocks,
merged like the image tokens, are added to the image positions after the first decoder layers. A
reduction keeps them consistent:

* before the LLM, every DeepStack level is reduced as the image tokens were: a kept token keeps its
  features, a merged token takes the mean of its group's (:meth:`Qwen3VLFamily.follow_groups`);
* inside the LLM, after an ``llm`` stage at a layer that DeepStack still adds to, each token takes
  its representative's features (the token whose position it takes) and dropped tokens none
  (:meth:`Qwen3VLFamily.install`).

The text attention normalises each query and key head before RoPE; the probes do the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import Qwen3VLProcessor

from ..compose.geometry import ModelGeometry, text_geometry
from .base import ALL_SIGNALS, config_name, decoder_shapes, register_family, register_preset
from .qwen2_vl import REFERENCE_GRID, QwenVLFamily


@register_family
@dataclasses.dataclass
class Qwen3VLFamily(QwenVLFamily):
    """``Qwen3VLForConditionalGeneration``."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)
    processor_class: ClassVar[type | None] = Qwen3VLProcessor

    @classmethod
    def read_geometry(cls, config: Any, name: str = "") -> ModelGeometry:
        """As Qwen2-VL (the plan assumes :data:`~.qwen2_vl.REFERENCE_GRID`); the tower's width is its
        ``hidden_size`` and it has no [CLS] (``cls_attention``: mean received attention)."""
        vision = config.vision_config
        merge = int(vision.spatial_merge_size)
        h, w = REFERENCE_GRID
        return ModelGeometry(
            name=name or config_name(config, "qwen3-vl"), family=config.model_type, image_tokens=h * w,
            grids=((h, w),), signals=ALL_SIGNALS - {"cls_hidden"},
            vision_hidden_size=int(vision.hidden_size), vision_heads=int(vision.num_heads),
            vision_tokens=h * w * merge * merge, vision_merge=merge * merge, cls_attention="mean",
            **text_geometry(config.get_text_config()),
        )

    def follow_groups(self, out: Any, groups: list[Tensor]) -> None:
        levels = getattr(out, "deepstack_features", None)
        if not levels:
            return
        sizes = [len(tokens) for tokens in out.pooler_output]
        out.deepstack_features = [
            tuple(group_means(feats, g, n) for feats, g, n in zip(level, groups, sizes, strict=True))
            for level in levels
        ]

    def install(self, run: Any, hooks: Any) -> None:
        text_model = self.base.language_model
        original = text_model._deepstack_process

        def deepstack(hidden: Tensor, mask: Tensor, embeds: Tensor) -> Tensor:
            p = run.prefill
            if p is None or not p.segments:
                return original(hidden, mask, embeds)
            # after decoder layer l, the last segment made (at a layer <= l) is the one in effect
            seg = p.segments[-1]
            mask = mask.to(seg.source.device)
            kept = mask.gather(1, seg.source)
            if seg.alive is not None:
                kept = kept & seg.alive
            ordinal = (mask.flatten().long().cumsum(0) - 1).view_as(mask)  # each image column's row of embeds
            return original(hidden, kept, embeds[ordinal.gather(1, seg.source)[kept].to(embeds.device)])

        hooks.patch(text_model, "_deepstack_process", deepstack)


def group_means(feats: Tensor, groups: Tensor, n_out: int) -> Tensor:
    """``[n_out, D]``: per output token, the mean of the features of the original tokens in its group
    (``groups[t]`` the output token of original token ``t``; -1: dropped; a token made from none: 0)."""
    groups = groups.to(feats.device)
    if n_out == feats.shape[0] and torch.equal(groups, torch.arange(n_out, device=feats.device)):
        return feats
    member = groups >= 0
    sums = feats.new_zeros(n_out, feats.shape[-1]).index_add_(0, groups[member], feats[member])
    counts = torch.zeros(n_out, dtype=feats.dtype, device=feats.device).index_add_(
        0, groups[member], torch.ones_like(groups[member], dtype=feats.dtype))
    return sums / counts.clamp(min=1)[:, None]


def qwen3_vl_8b(name: str) -> ModelGeometry:
    """Qwen3-VL-8B: a 36-layer decoder (4096 wide, 32 heads, 8 KV heads of 128, FFN 12288) behind a
    1152-wide ViT with 16 px patches and a 2x2 merger: a 768 px square is 24x24 = 576 image tokens."""
    shapes = {**decoder_shapes("qwen2-7b"), "num_layers": 36, "hidden_size": 4096, "num_heads": 32,
              "num_kv_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936}
    return ModelGeometry(
        name=name, family="qwen3_vl", image_tokens=576, grids=((24, 24),),
        signals=ALL_SIGNALS - {"cls_hidden"}, vision_hidden_size=1152, vision_heads=16, vision_tokens=2304,
        vision_merge=4, cls_attention="mean",
        **shapes,
    )


register_preset("qwen3-vl-8b", qwen3_vl_8b("qwen3-vl-8b"))
