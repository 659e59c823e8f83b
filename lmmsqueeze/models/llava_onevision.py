"""LLaVA-OneVision: ``transformers.LlavaOnevisionForConditionalGeneration``.

LLaVA-NeXT's layout with a SigLIP tower (no [CLS] token) and anyres-max tiles: a single-image sample's
image is the base crop's grid, then the unpadded sub-crop grid with one ``image_newline`` after each
row; when that grid is larger than ``anyres_max_N`` allows, the model downsamples it (bilinear, after
the projector), so its tokens are blends of crop tokens. An image in a multi-image sample is one crop
plus one trailing newline. Video frames (bilinear 2x2 pooling, one newline per video) are not image
tokens for pipelines.

Without [CLS], the ``cls_attention`` signal is the mean attention each token receives from its crop's
tokens in the feature layer (the tower's last); for blended tokens every vision signal is blended the
same way as the features. Vision-placement stages cannot pick blended tokens and are refused for such
an image; projector stages run on every image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import LlavaOnevisionProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from ..compose.geometry import ModelGeometry
from ..errors import ModelError
from ..reducers.base import Grids
from .base import ALL_SIGNALS, PackedImage, config_name, decoder_shapes, register_family, register_preset
from .llava import clip_geometry, feature_layer_index, llava_parts
from .llava_next import LlavaNextFamily
from .probes import VisionProbe, received_attention_probe

#: signals the [CLS]-free stand-in gives (the feature layer must be the tower's last)
STAND_IN = frozenset({"cls_attention", "last_cls_attention", "vision_keys", "last_vision_keys"})


@register_family
@dataclasses.dataclass
class LlavaOnevisionFamily(LlavaNextFamily):
    """``transformers.LlavaOnevisionForConditionalGeneration``."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
    processor_class: ClassVar[type | None] = LlavaOnevisionProcessor

    @classmethod
    def read_geometry(cls, config: Any, name: str = "") -> ModelGeometry:
        """The plan assumes a square image on a 2x2 crop grid that anyres-max keeps whole: the base
        ``s x s`` grid and a ``2s x 2s`` sub-crop grid (its newline tokens count as text)."""
        geometry, side, has_cls = clip_geometry(config, name, "llava-onevision")
        if not has_cls:
            if config.vision_feature_select_strategy == "default":
                raise ModelError("LLaVA-OneVision with a SigLIP tower and "
                                 "vision_feature_select_strategy='default' drops a real patch; use 'full' "
                                 "(the tower has no [CLS] token)")
            last = feature_layer_index(config) == config.vision_config.num_hidden_layers
            signals = (ALL_SIGNALS - {"cls_hidden"} - STAND_IN) | (STAND_IN if last else frozenset())
            geometry = dataclasses.replace(geometry, signals=signals, cls_attention="mean")
        elif config.vision_feature_select_strategy == "full":
            raise ModelError("LLaVA-OneVision with a CLIP tower and vision_feature_select_strategy='full' "
                             "is not supported; use 'default'")
        return dataclasses.replace(geometry, image_tokens=5 * side * side,
                                   grids=((side, side), (2 * side, 2 * side)), vision_crops=5)

    @classmethod
    def from_model(cls, model: nn.Module) -> LlavaOnevisionFamily:
        parts = llava_parts(model, cls.read_geometry(model.config, config_name(model.config)))
        parts["features_have_cls"] = parts["geometry"].cls_attention == "cls" and (
            model.config.vision_feature_select_strategy == "full")
        return cls(**parts)

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        kw = {k: base_kwargs[k] for k in ("image_sizes", "batch_num_images", "vision_aspect_ratio")
              if base_kwargs.get(k) is not None}
        return self.base.get_image_features(pixel_values=base_kwargs["pixel_values"], return_dict=True, **kw)

    def call_layouts(self, args: tuple, kwargs: dict) -> list[PackedImage] | None:
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        return None if sizes is None else self.layouts(sizes, kwargs.get("batch_num_images"))

    def image_geometries(self, inputs: Any) -> list[ModelGeometry]:
        layouts = self.layouts(inputs["image_sizes"], inputs.get("batch_num_images"))
        return [dataclasses.replace(self.geometry, image_tokens=int((~lay.separators).sum()), grids=lay.grids,
                                    vision_crops=lay.crops) for lay in layouts]

    def vision_probes(self, needs: set[str]) -> list[tuple[nn.Module, VisionProbe]]:
        if self.geometry.cls_attention == "cls":
            return super().vision_probes(needs)
        wanted = needs & self.geometry.signals & STAND_IN
        if not wanted:
            return []
        return [(self.vision_attention, functools.partial(received_attention_probe, needs=wanted))]

    def signal_rows(self, value: Tensor) -> Tensor:
        # SigLIP: no [CLS] row
        return value if self.geometry.cls_attention == "mean" else super().signal_rows(value)

    def layouts(self, image_sizes: Any, batch_num_images: Any = None) -> list[PackedImage]:
        """Each image's layout, found by packing index-valued stand-in features the model's own way; an
        image whose sub-crop grid is downsampled gets a ``pack`` that blends rows as the model does."""
        config = self.model.config
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        per_crop = side * side
        sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else [list(s) for s in image_sizes]
        counts = [len(sizes)] if batch_num_images is None else [int(n) for n in batch_num_images]
        anyres = [n == 1 or batch_num_images is None for n in counts for _ in range(n)]
        crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                           patch_size=int(vision.image_size)) if a else 1
                 for s, a in zip(sizes, anyres, strict=True)]
        out = []
        for size, k in zip(sizes, crops, strict=True):
            fake = torch.arange(k * per_crop, dtype=torch.float64).view(k, per_crop, 1)
            run = self._pack(fake, size, newline=torch.full((1,), -1.0, dtype=torch.float64))
            values = run[:, 0]
            separators = values == -1
            exact = bool((values[~separators] == values[~separators].round()).all())
            source = values.round().long().masked_fill(separators, -1)  # blended tokens: the nearest, unused
            n = int((~separators).sum())
            rows = int(separators.sum())
            grids: Grids = ((side, side), (rows, (n - per_crop) // rows)) if k > 1 else ((side, side),)
            crop_ids = torch.cat([torch.full((h * w,), c, dtype=torch.long)
                                  for c, (h, w) in enumerate(grids)])
            if crop_ids.numel() != n:
                raise ModelError(f"cannot read the LLaVA-OneVision layout of an image of size {size}")
            pack = None if exact else functools.partial(self._pack_rows, size=size)
            out.append(PackedImage(source, k, grids, crop_ids, pack))
        return out

    def _pack(self, features: Tensor, size: list[int], newline: Tensor | None) -> Tensor:
        packed, _ = self.base.pack_image_features([features], torch.tensor([size]), image_newline=newline,
                                                  vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return packed[0]

    def _pack_rows(self, rows: Tensor, size: list[int]) -> Tensor:
        """Per-crop rows ``[crops, T, ...]`` packed (and blended) as the model packs features,
        separators out."""
        shape = rows.shape[2:]
        flat = rows.reshape(rows.shape[0], rows.shape[1], math.prod(shape))
        return self._pack(flat.to(torch.float32), size, newline=None).to(rows.dtype).view(-1, *shape)


def siglip_onevision_7b(name: str) -> ModelGeometry:
    """LLaVA-OneVision-7B: Qwen2-7B behind SigLIP-so400m (1152 wide, 27x27 tokens per 384 px crop, no
    [CLS]); a 768 px square is the base crop and a 54x54 sub-crop grid: 3645 image tokens."""
    return ModelGeometry(
        name=name, family="llava_onevision", image_tokens=5 * 729, grids=((27, 27), (54, 54)),
        signals=ALL_SIGNALS - {"cls_hidden"}, vision_hidden_size=1152, vision_heads=16, vision_tokens=729,
        vision_crops=5, cls_attention="mean", **decoder_shapes("qwen2-7b"),
    )


register_preset("llava-onevision-7b", siglip_onevision_7b("llava-onevision-7b"))
