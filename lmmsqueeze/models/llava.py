"""LLaVA-1.5 and its relatives: ``transformers.LlavaForConditionalGeneration``.

A CLIP-style tower (a [CLS] token first) read at ``vision_feature_layer``, a projector, and one
grid of image tokens per image, which the LLM receives in place of the ``<image>`` placeholders.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

from torch import nn

from ..compose.geometry import ModelGeometry, text_geometry
from ..reducers.base import VISION_SIGNALS
from .base import (
    ALL_SIGNALS,
    CLS_SIGNALS,
    DECODERS,
    Family,
    config_name,
    decoder_shapes,
    pad_token_id,
    register_family,
    register_preset,
    without_signals,
)
from .probes import VisionProbe, cls_hidden_probe, feature_layer_probe, last_layer_probe


def feature_layer_index(config: Any) -> int | None:
    """1-based index of the vision layer whose output the projector reads (``hidden_states[i]`` is the
    output of ``layers[i-1]``), or None when it is not one layer (a list of layers, or out of range)."""
    layer = config.vision_feature_layer
    n = getattr(config.vision_config, "num_hidden_layers", None)
    if not isinstance(layer, int) or n is None:
        return None
    idx = layer if layer >= 0 else n + 1 + layer
    return idx if 1 <= idx <= n else None


def clip_geometry(config: Any, name: str, default_name: str) -> tuple[ModelGeometry, int, bool]:
    """A LLaVA-style model with a ViT tower (a [CLS] token when it is CLIP): one ``side x side``
    grid per crop. Returns the geometry, the side and whether the tower has [CLS]. Vision signals
    need the feature layer to be one layer of the tower."""
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    has_cls = getattr(vision, "model_type", "") == "clip_vision_model"
    geometry = ModelGeometry(
        name=name or config_name(config, default_name),
        family=config.model_type,
        image_tokens=side * side,
        grids=((side, side),),
        signals=ALL_SIGNALS if has_cls else ALL_SIGNALS - CLS_SIGNALS,
        vision_hidden_size=int(vision.hidden_size),
        vision_heads=int(getattr(vision, "num_attention_heads", 1)),
        vision_tokens=side * side + (1 if has_cls else 0),
        **text_geometry(config.get_text_config()),
    )
    if feature_layer_index(config) is None:
        geometry = without_signals(geometry, VISION_SIGNALS)
    return geometry, side, has_cls


@register_family
@dataclasses.dataclass
class LlavaFamily(Family):
    """``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5 and its relatives)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)

    @classmethod
    def read_geometry(cls, config: Any, name: str = "") -> ModelGeometry:
        geometry, side, has_cls = clip_geometry(config, name, "llava")
        if getattr(config, "vision_feature_select_strategy", "default") == "full":  # the features keep [CLS]
            return dataclasses.replace(geometry, image_tokens=side * side + (1 if has_cls else 0),
                                       grids=None if has_cls else geometry.grids)
        return geometry

    @classmethod
    def from_model(cls, model: nn.Module) -> LlavaFamily:
        return cls(**llava_parts(model, cls.read_geometry(model.config, config_name(model.config))))

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        kw = {k: base_kwargs[k]
              for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
              if base_kwargs.get(k) is not None}
        return self.base.get_image_features(pixel_values=base_kwargs["pixel_values"], return_dict=True, **kw)

    def vision_probes(self, needs: set[str]) -> list[tuple[nn.Module, VisionProbe]]:
        """A CLIP-style tower whose first token is [CLS]: probes at the feature layer's attention
        (``cls_attention``, ``vision_keys``), its output (``cls_hidden``) and the last layer's
        attention (``last_*``); each returns ``[crops, tokens, ...]`` with the [CLS] row."""
        probes: list[tuple[nn.Module, VisionProbe]] = []
        if needs & {"cls_attention", "vision_keys"}:
            probes.append((self.vision_attention, functools.partial(feature_layer_probe, needs=needs)))
        if "cls_hidden" in needs:
            probes.append((self.vision_layer, cls_hidden_probe))
        if needs & {"last_cls_attention", "last_vision_keys"}:
            probes.append((self.last_vision_attention, functools.partial(last_layer_probe, needs=needs)))
        return probes


def llava_parts(model: nn.Module, geometry: ModelGeometry) -> dict[str, Any]:
    """What LLaVA and LLaVA-NeXT share: module paths, the vision layers the probes read, ids."""
    config = model.config
    base = model.model
    tower = base.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)  # CLIPVisionModel(Transformer)
    idx = feature_layer_index(config)
    vision_layer = encoder.layers[idx - 1] if idx is not None and encoder is not None else None
    last = encoder.layers[-1] if vision_layer is not None else None
    return {
        "model": model,
        "base": base,
        "layers": base.language_model.layers,
        "rotary": base.language_model.rotary_emb,
        "projector": base.multi_modal_projector,
        "vision_attention": None if vision_layer is None else vision_layer.self_attn,
        "features_have_cls": config.vision_feature_select_strategy == "full",
        "image_token_id": int(config.image_token_id),
        "pad_token_id": pad_token_id(config),
        "geometry": geometry,
        "final_norm": base.language_model.norm,
        "vision_layer": vision_layer,
        "last_vision_attention": None if last is None else last.self_attn,
    }


def clip_l336_llava(name: str, decoder: str, vocab: int | None = None) -> ModelGeometry:
    """A published decoder behind CLIP ViT-L/14-336 (576 image tokens, a 24x24 grid)."""
    return ModelGeometry(
        name=name, family="llava", image_tokens=576, grids=((24, 24),), signals=ALL_SIGNALS,
        vision_hidden_size=1024, vision_heads=16, vision_tokens=577, **decoder_shapes(decoder, vocab),
    )


register_preset("llava-1.5-7b", clip_l336_llava("llava-1.5-7b", "vicuna-7b", vocab=32064))
register_preset("llava-1.5-13b", clip_l336_llava("llava-1.5-13b", "vicuna-13b", vocab=32064))
for _decoder in DECODERS:  # a bare decoder name: that decoder behind LLaVA-1.5's tower and projector
    register_preset(_decoder, clip_l336_llava(_decoder, _decoder))
