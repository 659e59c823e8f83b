"""Qwen2-VL and Qwen2.5-VL: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``.

The vision tower encodes every image of a call as one packed patch sequence; its 2x2 patch merger
(the projector here) turns each aligned 2x2 block of patches into one LLM image token. Positions are
3-D M-RoPE ids. ``Qwen2VLProcessor`` also builds a video processor, which needs torchvision;
lmmsqueeze does not depend on torchvision, so when the processor cannot be loaded it is built
without one (:func:`.base.image_only`), which prepares images and text as the full processor does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import Qwen2VLProcessor
from transformers.vision_utils import get_vision_window_index

from ..attention import mean_received_attention, vision_keys_fused
from ..compose.geometry import ModelGeometry, text_geometry
from ..errors import ModelError
from .base import (
    ALL_SIGNALS,
    Family,
    PackedImage,
    config_name,
    decoder_shapes,
    pad_token_id,
    register_family,
    register_preset,
)
from .probes import VisionProbe

#: the image the plan of a Qwen2-VL-family model assumes (the runtime uses every image's own grid):
#: 24x24 merged tokens, a 672 px square at patch 14 with a 2x2 merger
REFERENCE_GRID = (24, 24)
#: what a prompt holds for one image
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@register_family
@dataclasses.dataclass
class QwenVLFamily(Family):
    """``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

    The vision tower encodes every image of a call as one packed patch sequence; its 2x2 patch
    merger (the projector here) turns each aligned 2x2 block of patches (a "unit") into one LLM
    image token, and ``get_image_features`` splits the result per image (``image_grid_thw``). A
    ``vision`` stage reduces the units before the merger (its tokens are the four patches' features
    side by side); a ``projector`` stage reduces the merged tokens. Qwen2.5-VL runs its blocks on
    units in window order and restores raster order after the merger; layouts undo that order.

    Positions are 3-D M-RoPE ids: the runtime keeps every surviving token's original ids and passes
    them explicitly (see :mod:`.runtime`). The tower has no [CLS]: ``cls_attention`` is the mean
    attention each token receives in the last block (:func:`.probes.mean_received_attention`).
    """

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"
    )
    packs_features: ClassVar[bool] = True
    mrope: ClassVar[bool] = True
    prompt_image: ClassVar[str | None] = IMAGE_PLACEHOLDER
    #: Qwen2_5_VLProcessor prepares images and text as Qwen2VLProcessor does
    processor_class: ClassVar[type | None] = Qwen2VLProcessor

    @classmethod
    def read_geometry(cls, config: Any, name: str = "") -> ModelGeometry:
        """Image tokens are the 2x2-merged patch grid of each image (its size comes from
        ``image_grid_thw`` at run time; the plan assumes :data:`REFERENCE_GRID`). The vision tower has
        no [CLS] token: ``cls_attention`` is the mean attention each token receives in its last block."""
        vision = config.vision_config
        merge = int(vision.spatial_merge_size)
        h, w = REFERENCE_GRID
        width = (int(getattr(vision, "embed_dim", 0) or 0) if config.model_type == "qwen2_vl"
                 else int(vision.hidden_size))
        return ModelGeometry(
            name=name or config_name(config, config.model_type.replace("_", "-")),
            family=config.model_type,
            image_tokens=h * w,
            grids=((h, w),),
            signals=ALL_SIGNALS - {"cls_hidden"},
            vision_hidden_size=width,
            vision_heads=int(vision.num_heads),
            vision_tokens=h * w * merge * merge,
            vision_merge=merge * merge,
            cls_attention="mean",
            **text_geometry(config.get_text_config()),
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> QwenVLFamily:
        config = model.config
        base = model.model
        visual = base.visual
        return cls(
            model=model, base=base, layers=base.language_model.layers, rotary=base.language_model.rotary_emb,
            projector=visual.merger, vision_attention=visual.blocks[-1].attn, features_have_cls=False,
            image_token_id=int(config.image_token_id), pad_token_id=pad_token_id(config),
            geometry=cls.read_geometry(config, config_name(config)),
            final_norm=base.language_model.norm,
        )

    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        grid = base_kwargs.get("image_grid_thw")
        if grid is None:
            raise ModelError("Qwen2-VL image inputs need image_grid_thw; build them with the model's "
                             "processor")
        return self.base.get_image_features(pixel_values=base_kwargs["pixel_values"], image_grid_thw=grid,
                                            return_dict=True)

    layout_inputs: ClassVar[str] = "image_grid_thw"
    video_inputs: ClassVar[tuple[str, ...]] = ("video_grid_thw",)

    def call_layouts(self, args: tuple, kwargs: dict) -> list[PackedImage] | None:
        grid = kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None)
        return None if grid is None else self.layouts(grid)

    def image_geometries(self, inputs: Any) -> list[ModelGeometry]:
        m = self.merge
        return [dataclasses.replace(self.geometry, image_tokens=(h // m) * (w // m),
                                    grids=((h // m, w // m),), vision_tokens=h * w)
                for _, h, w in inputs["image_grid_thw"].tolist()]

    def layouts(self, image_grid_thw: Tensor) -> list[PackedImage]:
        """Each image's merged grid; ``source`` maps its raster-order tokens to the merger's rows."""
        m = self.merge
        grids = image_grid_thw.tolist()
        order = self._raster_to_rows(image_grid_thw)
        out, start = [], 0
        for t, h, w in grids:
            if t != 1:
                raise ModelError(f"an image with image_grid_thw {[t, h, w]} has {t} frames; pipelines reduce "
                                 "single-frame images (videos are not supported)")
            n = (h // m) * (w // m)
            source = order[start:start + n] - start
            out.append(PackedImage(source, n, ((h // m, w // m),), torch.zeros(n, dtype=torch.long)))
            start += n
        return out

    def _raster_to_rows(self, image_grid_thw: Tensor) -> Tensor:
        """For every merged token in raster order (all images), its row in the merger's input."""
        visual = self.base.visual
        m = self.merge
        total = int((image_grid_thw.prod(-1) // (m * m)).sum())
        if not hasattr(visual, "window_size"):  # Qwen2-VL: no window reordering
            return torch.arange(total)
        window_index, _ = get_vision_window_index(
            image_grid_thw.cpu(), spatial_merge_size=m, window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return torch.argsort(window_index.cpu())

    def vision_probes(self, needs: set[str]) -> list[tuple[nn.Module, VisionProbe]]:
        """One hook on the last block (the tower has no [CLS] and nothing after its feature layer): the
        stand-ins ``cls_attention`` = ``last_cls_attention`` = the mean attention each token receives from
        its image's tokens, ``vision_keys`` (head-mean) and ``last_vision_keys`` (full width), each averaged
        over a merge unit's four patches."""
        if not needs & set(self.geometry.signals):
            return []
        return [(self.vision_attention, functools.partial(self._last_block_probe, needs=needs))]

    def _last_block_probe(self, attention: nn.Module, args: tuple, kwargs: dict, output: Any,
                          needs: set[str]) -> dict[str, Tensor]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        unit = self.merge * self.merge
        keys = vision_keys_fused(attention, hidden)  # read by every signal: projected once
        out = {}
        if needs & {"cls_attention", "last_cls_attention"}:
            received = mean_received_attention(attention, hidden, kwargs["cu_seqlens"],
                                               kwargs["position_embeddings"], keys).view(-1, unit).mean(1)
            out.update({name: received for name in needs & {"cls_attention", "last_cls_attention"}})
        if "vision_keys" in needs:
            heads = keys.view(keys.shape[0], attention.num_heads, -1).mean(1)
            out["vision_keys"] = heads.view(-1, unit, heads.shape[-1]).mean(1)
        if "last_vision_keys" in needs:
            out["last_vision_keys"] = keys.view(-1, unit, keys.shape[-1]).mean(1)
        return out

    def projector_rows(self, features: Tensor) -> Tensor:
        unit = self.merge * self.merge
        return features.reshape(-1, 1, unit * features.shape[-1])

    def signal_rows(self, value: Tensor) -> Tensor:
        return value.unsqueeze(1)

    def project(self, hidden: Tensor) -> Tensor:
        unit = self.merge * self.merge
        return self.projector.forward(hidden.reshape(-1, hidden.shape[-1] // unit))

    def rope_index(self, input_ids: Tensor, mm_token_type_ids: Tensor | None, image_grid_thw: Tensor | None,
                   attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The model's own 3-D positions ``[3, B, L]`` and rope deltas ``[B, 1]`` of a prompt."""
        if mm_token_type_ids is None or image_grid_thw is None:
            raise ModelError("a Qwen2-VL prompt with images needs mm_token_type_ids and image_grid_thw (or "
                             "explicit position_ids); build it with the model's processor")
        return self.base.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                        image_grid_thw=image_grid_thw, attention_mask=attention_mask)


def qwen2_vl_7b(name: str, family: str = "qwen2_vl") -> ModelGeometry:
    """Qwen2-VL-7B: the Qwen2-7B decoder behind a 1280-wide ViT (patch 14) whose 2x2 patch merger gives
    the LLM's image tokens; a 672 px square image is a 48x48 patch grid, 24x24 = 576 image tokens."""
    return ModelGeometry(
        name=name, family=family, image_tokens=576, grids=((24, 24),), signals=ALL_SIGNALS - {"cls_hidden"},
        vision_hidden_size=1280, vision_heads=16, vision_tokens=2304, vision_merge=4, cls_attention="mean",
        **decoder_shapes("qwen2-7b"),
    )


register_preset("qwen2-vl-7b", qwen2_vl_7b("qwen2-vl-7b"))
# Qwen2.5-VL-7B: the same decoder shapes and merged grid; its windowed ViT is also 1280 wide
register_preset("qwen2.5-vl-7b", qwen2_vl_7b("qwen2.5-vl-7b", "qwen2_5_vl"))
