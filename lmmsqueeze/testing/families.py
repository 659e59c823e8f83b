"""Tiny random models of every supported family, built from transformers configs, and THE family table.

:data:`TINY_FAMILIES` has one :class:`TinyFamily` row per family; ``tests/test_families.py`` runs the
same contract (identity, every reducer, cached decoding, KV lengths, FLOPs, mixed batches, hooks,
``explain``) on every row. Adding a family is one file in :mod:`lmmsqueeze.models` and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .checks import count_flops
from .tiny import PROMPTS, noise_image, qwen_prompt, tiny_qwen_tokenizer, tiny_tokenizer

Sizes = tuple[tuple[int, int], ...]


def _tiny_configs(vocab: int, image_size: int, patch_size: int, layers: int, hidden: int, heads: int,
                  kv_heads: int, ffn: int, vision_hidden: int, vision_layers: int):
    """The CLIP vision and Llama text configs shared by the tiny LLaVA builders."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return vision, text


def _fixed_length_generation(model) -> None:
    """Random weights: decode a fixed number of tokens (no end-of-sequence), left padding with id 0."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0


def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 48, patch_size: int = 8, layers: int = 4,
               strategy: str = "default", hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
               vision_hidden: int = 32, vision_layers: int = 2):
    """A random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``.

    With the defaults an image gives a 6x6 grid of 36 image tokens and the decoder has 4 layers
    (hidden 64, 4 heads, 2 KV heads: grouped-query attention). Larger shapes (e.g. a
    LLaVA-1.5-like 336 px / patch 14 = 576 tokens) serve benchmarks.
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer()
    vision, text = _tiny_configs(len(tokenizer), image_size, patch_size, layers, hidden, heads, kv_heads, ffn,
                                 vision_hidden, vision_layers)
    side = image_size // patch_size
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=4, image_seq_length=side * side,
        vision_feature_layer=-2, vision_feature_select_strategy=strategy, pad_token_id=0,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _fixed_length_generation(model)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
        chat_template=None,
    )
    return model, processor


def _prompts_with_images(processor, images: list, prompt: Callable[[str], str] = str):
    """Sample ``i`` asks ``PROMPTS[i]`` (through ``prompt``, the family's placeholder) about ``images[i]``
    (several samples: a left-padded batch)."""
    texts = [prompt(PROMPTS[i % len(PROMPTS)]) for i in range(len(images))]
    if len(images) == 1:
        return processor(images=images[0], text=texts[0], return_tensors="pt")
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _noise_images(batch: int, sizes: Sizes) -> list:
    """Sample ``i``'s noise image (seed ``i``) of ``sizes[i % len(sizes)]`` (w, h)."""
    return [noise_image(i, *sizes[i % len(sizes)]) for i in range(batch)]


def tiny_inputs(processor, batch: int = 1, image_size: int = 48):
    """Processor outputs for batch 1, or a left-padded batch of prompts of different lengths."""
    return _prompts_with_images(processor, _noise_images(batch, ((image_size, image_size),)))


def tiny_llava_inputs(processor, batch: int = 1, sizes: Sizes = ((48, 48),)):
    """LLaVA processor outputs: sample ``i`` gets an image of ``sizes[i % len(sizes)]`` (w, h), which the
    processor resizes and crops to the model's square."""
    return _prompts_with_images(processor, _noise_images(batch, sizes))


def tiny_llava_next(attn: str = "sdpa", seed: int = 0, image_size: int = 32, patch_size: int = 8,
                    layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
                    vision_hidden: int = 32, vision_layers: int = 2):
    """A random ``LlavaNextForConditionalGeneration`` and its ``LlavaNextProcessor``.

    Crops are ``image_size`` px (4x4 tokens with the defaults) and the anyres grids are 1x1, 1x2,
    2x1 and 2x2 crops, so a 64x64 image gives a 4x4 base crop, an 8x8 sub-crop grid and 8
    newline tokens: 88 image placeholders (see :func:`tiny_next_inputs`).
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = tiny_tokenizer()
    vision, text = _tiny_configs(len(tokenizer), image_size, patch_size, layers, hidden, heads, kv_heads, ffn,
                                 vision_hidden, vision_layers)
    s = image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=4, image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _fixed_length_generation(model)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=None,
    )
    return model, processor


def tiny_next_inputs(processor, batch: int = 1, sizes: Sizes = ((64, 64),)):
    """LLaVA-NeXT processor outputs: sample ``i`` gets an image of ``sizes[i % len(sizes)]`` (w, h)."""
    return _prompts_with_images(processor, _noise_images(batch, sizes))


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0, version: str = "2", layers: int = 4, hidden: int = 64,
                  heads: int = 4, kv_heads: int = 2, ffn: int = 128):
    """A random ``Qwen2VLForConditionalGeneration`` (``version="2"``) or
    ``Qwen2_5_VLForConditionalGeneration`` (``"2.5"``, windowed vision attention) and its
    :class:`~lmmsqueeze.models.qwen2_vl.QwenImageProcessor`.

    Patches are 14 px, merged 2x2, so a 168x168 image is a 12x12 patch grid and 6x6 = 36 image
    tokens; M-RoPE sections are (2, 3, 3) over head_dim 16.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_qwen_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    ids = dict(image_token_id=4, vision_start_token_id=5, vision_end_token_id=6, video_token_id=7,
               pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if version == "2":
        from transformers import Qwen2VLConfig
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden, num_heads=4,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        raise ValueError(f"version {version!r} is not one of '2', '2.5'")
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Model(config).eval()
    _fixed_length_generation(model)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 256, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    from ..models.qwen2_vl import QwenImageProcessor

    return model, QwenImageProcessor(tokenizer, image_processor)


def tiny_qwen_inputs(processor, batch: int = 1, sizes: Sizes = ((168, 168),)):
    """Qwen2-VL inputs: sample ``i`` gets a noise image of ``sizes[i % len(sizes)]`` (w, h)."""
    images = _noise_images(batch, sizes)
    texts = [qwen_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    return processor(images=images, text=texts if batch > 1 else texts[0], return_tensors="pt")


# ----------------------------------------------------------------------------- the family table


def _projected_flops(model, tokens: int) -> int:
    """A LLaVA projector (linear, GELU, linear) on ``tokens`` vision features: 2 x tokens x (dv d + d d)."""
    from ..models import family_for

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
    from ..models import family_for

    g = family_for(model).geometry
    unit, d = g.vision_merge * g.vision_hidden_size, g.hidden_size
    return vision + 2 * (_vision_stage_tokens(plan) or 0) * (unit * unit + unit * d)


def _image_newline(model) -> torch.Tensor:
    return model.model.image_newline


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

    def __post_init__(self) -> None:
        if self.placeholders is None:
            object.__setattr__(self, "placeholders", self.image_tokens)
        for field in ("sizes", "image_tokens", "pooled", "placeholders"):
            value = getattr(self, field)
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
]}


# ----------------------------------------------------------------------------- reducers on the tiny models

#: parameters that make a reducer fit the tiny models (few image tokens, 4 layers); defaults otherwise
TINY_STAGE_PARAMS: dict[str, str] = {
    "proxyv": "layer=2, factor=2",
    "pdrop": "layer=1, step=1, stages=3",
    "sparsevlm": 'layer=1, more_layers="2,3", budget=64',
    "dart": "keep=16",
}


def tiny_pipeline(name: str, placement: str | None = None) -> str:
    """A one-stage pipeline that runs reducer ``name`` on the tiny models: its
    :data:`TINY_STAGE_PARAMS`, plus ``layer=2`` when it runs in the LLM (``placement="llm"``, or
    a reducer that only runs there), or ``at=<placement>`` for a pre-LLM placement other than its
    default (the first it declares)."""
    from ..reducers import get_reducer

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
