"""The family table: one row per supported family, a tiny random model (:mod:`.builders`) and what the
contract tests need to know about it.

:data:`TINY_FAMILIES` has one :class:`TinyFamily` row per family; ``tests/test_families.py`` runs the
same contract (identity, every reducer, cached decoding, KV lengths, FLOPs, mixed batches, hooks,
``explain``) on every row. Adding a family is one file in :mod:`lmmsqueeze.models` and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..models import family_for
from ..reducers import get_reducer
from .builders import (
    internvl_prompt,
    tiny_internvl,
    tiny_internvl_inputs,
    tiny_llava,
    tiny_llava_inputs,
    tiny_llava_next,
    tiny_next_inputs,
    tiny_onevision,
    tiny_onevision_inputs,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
    tiny_qwen_inputs,
)
from .checks import count_flops
from .tiny import qwen_prompt

# ----------------------------------------------------------------------------- the family table


def _projected_flops(model, tokens: int) -> int:
    """A LLaVA projector (linear, GELU, linear) on ``tokens`` vision features: 2 x tokens x (dv d + d d)."""
    g = family_for(model).geometry
    dv, d = g.vision_hidden_size, g.hidden_size
    return 2 * tokens * (dv * d + d * d)


def _vision_stage_tokens(plan) -> int | None:
    """Tokens the last ``vision`` stage of ``plan`` hands on, or None without one."""
    return plan.at("vision")[-1].tokens_out if plan.at("vision") else None


def _llava_encoder_flops(model, inputs, plan) -> int:
    """The CLIP tower, then the projector on what reaches it: every patch token, or a vision stage's
    survivors."""
    vision = count_flops(lambda: model.model.vision_tower(inputs["pixel_values"]))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    kept = _vision_stage_tokens(plan)
    return vision + _projected_flops(model, side * side if kept is None else kept)


def _llava_next_encoder_flops(model, inputs, plan) -> int:
    """The CLIP tower and the projector on every crop of the (one) image; a vision stage projects its
    survivors again."""
    vision = count_flops(lambda: model.model.vision_tower(inputs["pixel_values"][0]))
    crops = inputs["pixel_values"].shape[1]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return vision + _projected_flops(model, crops * side * side + (_vision_stage_tokens(plan) or 0))


def _qwen_encoder_flops(model, inputs, plan) -> int:
    """The vision tower with its patch merger as the model runs it; a vision stage merges its survivors
    again (merger MLP: 4 dv -> 4 dv -> d)."""
    visual = model.model.visual
    vision = count_flops(lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
    g = family_for(model).geometry
    unit, d = g.vision_merge * g.vision_hidden_size, g.hidden_size
    return vision + 2 * (_vision_stage_tokens(plan) or 0) * (unit * unit + unit * d)


def _internvl_encoder_flops(model, inputs, plan) -> int:
    """The ViT on every tile, then the projector (layer norm, linear 4 dv -> d, GELU, linear d -> d) on
    what reaches it: every shuffled token of every tile, or a vision stage's survivors."""
    pixels = inputs["pixel_values"]
    vision = count_flops(lambda: model.model.vision_tower(pixel_values=pixels))
    g = family_for(model).geometry
    unit, d = g.vision_merge * g.vision_hidden_size, g.hidden_size
    kept = _vision_stage_tokens(plan)
    tokens = pixels.shape[0] * g.image_tokens if kept is None else kept
    return vision + 2 * tokens * (unit * d + d * d)


def _image_newline(model) -> torch.Tensor:
    return model.model.image_newline


class Counts(NamedTuple):
    """Per image, for each of a row's two sizes: its image tokens (separators excluded), the tokens it
    keeps after ``pool`` (2x2 windows on every crop grid) and its placeholders (separators included)."""

    image_tokens: tuple[int, int]
    pooled: tuple[int, int]
    placeholders: tuple[int, int]


@dataclass(frozen=True)
class TinyFamily:
    """One row of the family table: a tiny random model of one family and what the contract tests need.

    Attributes:
        name: the row's id in test names (the model's ``model_type``).
        build: ``build(attn="sdpa") -> (model, processor)``, a tiny random model with 4 decoder layers
            (what :data:`TINY_STAGE_PARAMS` and the contract's pipelines assume) and its processor.
        inputs: ``inputs(processor, batch, sizes) -> processor outputs``; sample ``i`` asks
            ``PROMPTS[i % 3]`` about a noise image (seed ``i``) of ``sizes[i % len(sizes)]`` (w, h).
        sizes: ``(w, h)`` of a square image, then of an image of another size.
        image_tokens: the image tokens each of ``sizes`` gives (separators excluded).
        pooled: the image tokens each of ``sizes`` keeps after ``pool`` (2x2 windows on every crop grid).
        preset: the published 7-8B model of the family, for ``explain --model-config``.
        encoder_flops: ``encoder_flops(model, inputs, plan) -> int``, the FLOPs spent before the decoder
            (vision tower, projector, re-projected vision-stage survivors) for one image, counted on the
            modules the model runs.
        prompt: turns a LLaVA-style prompt (``<image>`` per image) into the family's own.
        placeholders: the image placeholders each of ``sizes`` puts in the prompt, separators included
            (default: ``image_tokens``).
        separator: the embedding of separator tokens among the image placeholders, which no stage
            may drop (LLaVA-NeXT's ``image_newline``), or None.
        several: the :class:`Counts` of an image in a sample with several images, where the family
            encodes it otherwise (LLaVA-OneVision: the base crop only); default: as alone.
    """

    name: str
    build: Callable[..., tuple[Any, Any]]
    inputs: Callable[..., Any]
    sizes: tuple[tuple[int, int], tuple[int, int]]
    image_tokens: tuple[int, int]
    pooled: tuple[int, int]
    preset: str
    encoder_flops: Callable[[Any, Any, Any], int]
    prompt: Callable[[str], str] = str
    placeholders: tuple[int, int] | None = None
    separator: Callable[[Any], torch.Tensor] | None = None
    several: Counts | None = None

    def __post_init__(self) -> None:
        if self.placeholders is None:
            object.__setattr__(self, "placeholders", self.image_tokens)
        if self.several is None:
            object.__setattr__(self, "several", Counts(self.image_tokens, self.pooled, self.placeholders))
        values = {name: getattr(self, name) for name in ("sizes", *Counts._fields)}
        values.update({f"several.{name}": value for name, value in self.several._asdict().items()})
        for field, value in values.items():
            if len(value) != 2:
                raise ValueError(f"TinyFamily {self.name!r}: {field}={value!r} must give two values, one for "
                                 "the square image and one for the other size")
        (w, h), other = self.sizes
        if w != h or other == (w, h):
            raise ValueError(f"TinyFamily {self.name!r}: sizes={self.sizes!r} must be a square (w, h), then "
                             "another size")

    def __repr__(self) -> str:
        return f"TinyFamily({self.name!r})"


def _qwen2_5_vl(attn: str = "sdpa", **kwargs):
    return tiny_qwen2_vl(attn=attn, version="2.5", **kwargs)


#: one row per family: every row runs the contract of ``tests/test_families.py``
TINY_FAMILIES: dict[str, TinyFamily] = {row.name: row for row in [
    # 48 px / patch 8: a 6x6 grid, 36 tokens (pooled 3x3 = 9); a 64x48 image is resized and cropped to
    # the same square
    TinyFamily("llava", tiny_llava, tiny_llava_inputs, sizes=((48, 48), (64, 48)), image_tokens=(36, 36),
               pooled=(9, 9), preset="llava-1.5-7b", encoder_flops=_llava_encoder_flops),
    # 32 px crops of 4x4 tokens: 64x64 is the base crop + an 8x8 sub-crop grid (16 + 64 = 80 tokens, pooled
    # 4 + 16 = 20) and a newline after each of its 8 rows (88 placeholders); 64x48 unpads the sub-crop grid
    # to 6x8 (16 + 48 = 64, pooled 4 + 12 = 16) with 6 newlines (70)
    TinyFamily("llava_next", tiny_llava_next, tiny_next_inputs, sizes=((64, 64), (64, 48)),
               image_tokens=(80, 64), pooled=(20, 16), preset="llava-next-7b",
               encoder_flops=_llava_next_encoder_flops, placeholders=(88, 70), separator=_image_newline),
    # 14 px patches merged 2x2: 168x168 is 12x12 patches, 6x6 = 36 tokens (pooled 9); 112x168 (w x h) is
    # 12x8 patches, 6x4 = 24 tokens (pooled 3x2 = 6)
    TinyFamily("qwen2_vl", tiny_qwen2_vl, tiny_qwen_inputs, sizes=((168, 168), (112, 168)),
               image_tokens=(36, 24), pooled=(9, 6), preset="qwen2-vl-7b",
               encoder_flops=_qwen_encoder_flops, prompt=qwen_prompt),
    TinyFamily("qwen2_5_vl", _qwen2_5_vl, tiny_qwen_inputs, sizes=((168, 168), (112, 168)),
               image_tokens=(36, 24), pooled=(9, 6), preset="qwen2.5-vl-7b",
               encoder_flops=_qwen_encoder_flops, prompt=qwen_prompt),
    # 16 px patches merged 2x2: 192x192 is 12x12 patches, 36 tokens (pooled 9); 128x192 is 6x4 = 24 (6)
    TinyFamily("qwen3_vl", tiny_qwen3_vl, tiny_qwen_inputs, sizes=((192, 192), (128, 192)),
               image_tokens=(36, 24), pooled=(9, 6), preset="qwen3-vl-8b",
               encoder_flops=_qwen_encoder_flops, prompt=qwen_prompt),
    # LLaVA-NeXT's anyres on 32 px crops (the row above's counts); in a sample with several images an
    # image is its base crop (16 tokens, pooled 4) and one newline
    TinyFamily("llava_onevision", tiny_onevision, tiny_onevision_inputs, sizes=((64, 64), (64, 48)),
               image_tokens=(80, 64), pooled=(20, 16), preset="llava-onevision-7b",
               encoder_flops=_llava_next_encoder_flops, placeholders=(88, 70), separator=_image_newline,
               several=Counts((16, 16), (4, 4), (17, 17))),
    # one 96 px tile each (a 96x72 image is stretched to the square tile): 6x6 = 36 tokens (pooled 9)
    TinyFamily("internvl", tiny_internvl, tiny_internvl_inputs, sizes=((96, 96), (96, 72)),
               image_tokens=(36, 36), pooled=(9, 9), preset="internvl3-8b",
               encoder_flops=_internvl_encoder_flops, prompt=internvl_prompt),
]}


# ----------------------------------------------------------------------------- reducers on the tiny models

#: parameters that make a reducer fit the tiny models (few image tokens, 4 layers); defaults otherwise
TINY_STAGE_PARAMS: dict[str, str] = {
    "proxyv": "layer=2, factor=2",
    "pdrop": "layer=1, step=1, stages=3",
    "sparsevlm": 'layer=1, more_layers="2,3", budget=64',
    "dart": "keep=16",
    "visionzip": "dominant=10, contextual=4",  # the defaults (54 + 10) are more than a tiny image's tokens
}


def tiny_pipeline(name: str, placement: str | None = None) -> str:
    """A one-stage pipeline that runs reducer ``name`` on the tiny models: its
    :data:`TINY_STAGE_PARAMS`, plus ``layer=2`` when it runs in the LLM (``placement="llm"``, or
    a reducer that only runs there), or ``at=<placement>`` for a pre-LLM placement other than its
    default (the first it declares)."""
    placements = get_reducer(name).placements
    if placement is not None and placement not in placements:
        raise ValueError(f"{name} runs at {', '.join(placements)}, not at {placement!r}")
    params = TINY_STAGE_PARAMS.get(name, "")
    if placement is None:
        placement = "llm" if placements == ("llm",) else None
    if placement == "llm" and "layer=" not in params:
        params = ", ".join(p for p in (params, "layer=2") if p)
    elif placement not in (None, "llm") and placement != next(p for p in placements if p != "llm"):
        params = ", ".join(p for p in (params, f"at={placement}") if p)
    return f"{name}({params})" if params else name
