"""LLaVA-NeXT: ``transformers.LlavaNextForConditionalGeneration``.

Every image is a base crop plus sub-crops (anyres); ``get_image_features`` packs them as the base
crop's grid, then the unpadded sub-crop grid with one ``image_newline`` token after each of its rows
(separators: text for every stage). The plan assumes a square image on a 2x2 crop grid; at run time
each image's grids come from its size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..compose.geometry import ModelGeometry
from ..errors import ModelError
from ..reducers.base import Grids
from .base import PackedImage, config_name, register_family, register_preset
from .llava import LlavaFamily, clip_geometry, clip_l336_llava, llava_parts


@register_family
@dataclasses.dataclass
class LlavaNextFamily(LlavaFamily):
    """``transformers.LlavaNextForConditionalGeneration``."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    packs_features: ClassVar[bool] = True
    layout_inputs: ClassVar[str] = "image_sizes"

    @classmethod
    def read_geometry(cls, config: Any, name: str = "") -> ModelGeometry:
        """A base crop plus the unpadded grid of sub-crops (a newline token after each of its rows,
        which counts as text). The plan assumes a square image on a 2x2 crop grid, i.e. 5 crops:
        the base ``s x s`` grid and a ``2s x 2s`` sub-crop grid."""
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            raise ModelError("LLaVA-NeXT with vision_feature_select_strategy='full' is not supported; "
                             "use 'default'")
        geometry, side, _ = clip_geometry(config, name, "llava-next")
        return dataclasses.replace(geometry, image_tokens=5 * side * side,
                                   grids=((side, side), (2 * side, 2 * side)), vision_crops=5)

    @classmethod
    def from_model(cls, model: nn.Module) -> LlavaNextFamily:
        return cls(**llava_parts(model, cls.read_geometry(model.config, config_name(model.config))))

    def call_layouts(self, args: tuple, kwargs: dict) -> list[PackedImage] | None:
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        strategy = (kwargs.get("vision_feature_select_strategy")
                    or self.model.config.vision_feature_select_strategy)
        return None if sizes is None else self.layouts(sizes, strategy)

    def count_image_tokens(self, inputs: Any) -> int:
        return sum(g.image_tokens for g in self.image_geometries(inputs))  # newline separators are text

    def image_geometries(self, inputs: Any) -> list[ModelGeometry]:
        layouts = self.layouts(inputs["image_sizes"], self.model.config.vision_feature_select_strategy)
        return [dataclasses.replace(self.geometry, image_tokens=int((~lay.separators).sum()), grids=lay.grids,
                                    vision_crops=lay.crops) for lay in layouts]

    def layouts(self, image_sizes: Any, strategy: str) -> list[PackedImage]:
        """Each image's layout, found by packing index-valued stand-in features the model's own way."""
        config = self.model.config
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        per_crop = side * side
        sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else [list(s) for s in image_sizes]
        counts = [image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                            patch_size=int(vision.image_size)) for s in sizes]
        fake = [torch.arange(k * per_crop, dtype=torch.float64).view(k, per_crop, 1) for k in counts]
        newline = torch.full((1,), -1.0, dtype=torch.float64)
        packed, _ = self.base.pack_image_features(fake, torch.tensor(sizes), strategy, image_newline=newline)
        out = []
        for k, run in zip(counts, packed, strict=True):
            source = run[:, 0].round().long()
            rows = int((source < 0).sum())
            n = int((source >= 0).sum())
            if k > 1 and rows:
                cols = (n - per_crop) // rows
                grids: Grids = ((side, side), (rows, cols))
            else:
                grids = ((side, side),)
            crop_ids = torch.cat([torch.full((h * w,), c, dtype=torch.long)
                                  for c, (h, w) in enumerate(grids)])
            if crop_ids.numel() != n:
                raise ModelError(f"cannot read the LLaVA-NeXT layout of an image of size {sizes[len(out)]}")
            out.append(PackedImage(source, k, grids, crop_ids))
        return out


def clip_l336_llava_next(name: str, decoder: str, vocab: int | None = None) -> ModelGeometry:
    """LLaVA-NeXT (anyres): a square image on a 2x2 crop grid, 5 crops x 576 = 2880 image tokens (the
    base 24x24 crop and the 48x48 sub-crop grid; its 48 newline tokens count as text)."""
    return dataclasses.replace(clip_l336_llava(name, decoder, vocab), family="llava_next", image_tokens=2880,
                               grids=((24, 24), (48, 48)), vision_crops=5)


register_preset("llava-next-7b", clip_l336_llava_next("llava-next-7b", "vicuna-7b", vocab=32064))
