"""InternVL (2.5, 3): ``transformers.InternVLForConditionalGeneration``.

The processor cuts each image into dynamic tiles (plus a thumbnail, last, when there is more than
one); the ViT (a [CLS] token first) encodes every tile, a pixel shuffle turns each 2x2 block of
patches into one token (their features side by side: the projector's input), and the projector
maps them to the LLM: 256 tokens per 448 px tile, all tiles of a call in one tensor.

The processor's outputs do not say which tiles belong to which image, so the stages before the LLM
see each **tile** as an image (a 16x16 grid; ``keep`` budgets are per tile); the stages inside the
LLM see each sample's tokens of every tile together. Vision signals are measured on patches and
averaged over each shuffle unit's four patches, as Qwen2-VL's merge units are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import InternVLProcessor

from ..compose.geometry import ModelGeometry, text_geometry
from ..errors import ModelError
from .base import (
    ALL_SIGNALS,
    Family,
    config_name,
    decoder_shapes,
    pad_token_id,
    register_family,
    register_preset,
)
from .llava import feature_layer_index
from .probes import VisionProbe, feature_layer_probe, last_layer_probe


@register_family
@dataclasses.dataclass
class InternVLFamily(Family):
    """``transformers.InternVLForConditionalGeneration``: one image record per tile."""

    model_types: ClassVar[tuple[str, ...]] = ("internvl",)
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    processor_class: ClassVar[type | None] = InternVLProcessor

    @classmethod
    def read_geometry(cls, config: Any, name: str = "") -> ModelGeometry:
        """One tile: ``(image_size / patch)^2`` patches and [CLS] in the ViT, shuffled into a
        ``side x side`` grid of tokens (``side`` = patches per row x ``downsample_ratio``)."""
        vision = config.vision_config
        patches = int(vision.image_size[0] if isinstance(vision.image_size, (list, tuple))
                      else vision.image_size)
        patch = int(vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple))
                    else vision.patch_size)
        per_row = patches // patch
        side = int(per_row * config.downsample_ratio)
        if side * side * round(1 / config.downsample_ratio ** 2) != per_row * per_row:
            raise ModelError(f"InternVL with downsample_ratio={config.downsample_ratio} on a "
                             f"{per_row}x{per_row} patch grid is not supported; use 0.5")
        if config.vision_feature_select_strategy != "default":
            raise ModelError("InternVL with vision_feature_select_strategy='full' keeps [CLS] before the "
                             "pixel shuffle, which then mixes it into a token; use 'default'")
        # the [CLS] feature cannot be a token: the projector takes shuffle units, four patches wide
        signals = ALL_SIGNALS - {"cls_hidden"}
        if feature_layer_index(config) is None:
            signals -= {"cls_attention", "vision_keys", "last_cls_attention", "last_vision_keys"}
        return ModelGeometry(
            name=name or config_name(config, "internvl"), family=config.model_type, image_tokens=side * side,
            grids=((side, side),), signals=signals, vision_hidden_size=int(vision.hidden_size),
            vision_heads=int(vision.num_attention_heads), vision_tokens=per_row * per_row + 1,
            vision_merge=round(1 / config.downsample_ratio ** 2), **text_geometry(config.get_text_config()),
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> InternVLFamily:
        config = model.config
        base = model.model
        layers = base.vision_tower.encoder.layer
        idx = feature_layer_index(config)
        vision_layer = layers[idx - 1] if idx is not None else None
        return cls(
            model=model, base=base, layers=base.language_model.layers, rotary=base.language_model.rotary_emb,
            projector=base.multi_modal_projector,
            vision_attention=None if vision_layer is None else vision_layer.attention,
            features_have_cls=False, image_token_id=int(config.image_token_id),
            pad_token_id=pad_token_id(config), geometry=cls.read_geometry(config, config_name(config)),
            final_norm=base.language_model.norm, vision_layer=vision_layer,
            last_vision_attention=None if vision_layer is None else layers[-1].attention,
        )

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        return self.base.get_image_features(pixel_values=base_kwargs["pixel_values"], return_dict=True)

    def pooled(self, features: list[Tensor]) -> Any:
        return torch.cat(features)  # the model's forward takes one tensor

    def vision_probes(self, needs: set[str]) -> list[tuple[nn.Module, VisionProbe]]:
        """As CLIP's ([CLS] first), at the feature layer's attention and the last layer's attention."""
        probes: list[tuple[nn.Module, VisionProbe]] = []
        if needs & {"cls_attention", "vision_keys"}:
            probes.append((self.vision_attention, functools.partial(feature_layer_probe, needs=needs)))
        if needs & {"last_cls_attention", "last_vision_keys"}:
            probes.append((self.last_vision_attention, functools.partial(last_layer_probe, needs=needs)))
        return probes

    def signal_rows(self, value: Tensor) -> Tensor:
        """Patch signals ``[tiles, 1 + P, ...]`` ([CLS] first) as the mean over each shuffle unit's
        patches, ``[tiles, units, ...]`` in the projector's order."""
        units = self._units(value.shape[1] - 1).to(value.device)  # [units, patches per unit]
        return value[:, 1:][:, units].mean(2)

    def _units(self, patches: int) -> Tensor:
        """The patches (raster order) of every shuffle unit, found by shuffling their indices the
        model's way."""
        per_row = int(round(patches ** 0.5))
        index = torch.arange(patches, dtype=torch.float64).view(1, per_row, per_row, 1)
        shuffled = self.base.pixel_shuffle(index, scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(-1, shuffled.shape[-1]).round().long()


def internvl3_8b(name: str) -> ModelGeometry:
    """InternVL3-8B: InternViT-300M (448 px tiles, patch 14: 32x32 patches and [CLS], 1024 wide) and
    Qwen2.5-7B; one tile is 16x16 = 256 image tokens (an image is 1 to 12 tiles plus a thumbnail)."""
    return ModelGeometry(
        name=name, family="internvl", image_tokens=256, grids=((16, 16),),
        signals=ALL_SIGNALS - {"cls_hidden"},
        vision_hidden_size=1024, vision_heads=16, vision_tokens=1025, vision_merge=4,
        **decoder_shapes("qwen2-7b", vocab=151674),
    )


register_preset("internvl3-8b", internvl3_8b("internvl3-8b"))
