"""Tiny random models of every supported family, built from transformers configs, and their inputs.

Every builder returns ``(model, processor)``: a random ``*ForConditionalGeneration`` with 4 decoder
layers (hidden 64, 4 heads, 2 KV heads: grouped-query attention), a small vision tower, and the
family's real transformers processor (without its video processor: :func:`~lmmsqueeze.models.base.image_only`)
around an in-memory word-level tokenizer. Generation decodes a fixed number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..models.base import image_only
from .tiny import (
    PROMPTS,
    SPECIALS,
    noise_image,
    qwen_prompt,
    tiny_qwen_tokenizer,
    tiny_tokenizer,
    word_tokenizer,
)

Sizes = tuple[tuple[int, int], ...]


def _tiny_configs(vocab: int, image_size: int, patch_size: int, layers: int, hidden: int, heads: int,
                  kv_heads: int, ffn: int, vision_hidden: int, vision_layers: int):
    """The CLIP vision and Llama text configs shared by the tiny LLaVA builders."""

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
    processor (``Qwen2VLProcessor`` or ``Qwen2_5_VLProcessor`` without a video processor).

    Patches are 14 px, merged 2x2, so a 168x168 image is a 12x12 patch grid and 6x6 = 36 image
    tokens; M-RoPE sections are (2, 3, 3) over head_dim 16.
    """

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
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        Model = Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden, num_heads=4,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        Model = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version {version!r} is not one of '2', '2.5'")
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Model(config).eval()
    _fixed_length_generation(model)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 256, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    processor_class = Qwen2VLProcessor if version == "2" else Qwen2_5_VLProcessor
    return model, image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                              chat_template=None)


def tiny_qwen_inputs(processor, batch: int = 1, sizes: Sizes = ((168, 168),)):
    """Qwen2-VL (and Qwen3-VL) inputs: sample ``i`` gets a noise image of ``sizes[i % len(sizes)]`` (w, h)."""
    return _prompts_with_images(processor, _noise_images(batch, sizes), qwen_prompt)


def _set_attention(config, attn: str) -> None:
    """``attn`` for the model, its text and its vision config."""
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn


def _small_qwen2(vocab: int, layers: int) -> Qwen2Config:
    """The Qwen2 decoder of the tiny OneVision and InternVL models (hidden 64, 4 heads, 2 KV heads)."""
    return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                       max_position_embeddings=4096)


def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0, layers: int = 4):
    """A random ``Qwen3VLForConditionalGeneration`` and its ``Qwen3VLProcessor``.

    Patches are 16 px, merged 2x2, so a 192x192 image is a 12x12 patch grid and 6x6 = 36 image tokens;
    interleaved M-RoPE sections (2, 3, 3) over head_dim 16; the 3-block tower hands DeepStack the
    features of blocks 0 and 1 (added after decoder layers 0 and 1).
    """
    tokenizer = tiny_qwen_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         pad_token_id=0, max_position_embeddings=4096, rope_parameters=rope),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=4, vision_start_token_id=5, vision_end_token_id=6, video_token_id=7, pad_token_id=0,
    )
    _set_attention(config, attn)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    _fixed_length_generation(model)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32 * 256, patch_size=16,
                                               merge_size=2, temporal_patch_size=2)
    return model, image_only(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                               chat_template=None)


def tiny_onevision(attn: str = "sdpa", seed: int = 0, aspect: str = "anyres_max_9", layers: int = 4):
    """A random ``LlavaOnevisionForConditionalGeneration`` and its ``LlavaOnevisionProcessor``.

    A SigLIP tower (no [CLS], every patch a feature) with 32 px crops of 4x4 tokens and the anyres grids
    1x1, 1x2, 2x1, 2x2 and 3x3 crops: a 64x64 image is the base crop + an 8x8 sub-crop grid and a newline
    after each of its rows (80 image tokens, 88 placeholders). With ``aspect="anyres_max_1"`` a
    sub-crop grid of more than 1.1 x 16 tokens is resized (bilinear) to 4x4: a blended image.
    """
    tokenizer = word_tokenizer(SPECIALS + ["<video>"], {"image_token": "<image>", "video_token": "<video>"},
                               atomic=("<image>", "<video>"))
    s, patch = 32, 8
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, 3 * s]]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=s, patch_size=patch, vision_use_head=False)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_small_qwen2(len(tokenizer), layers),
        image_token_index=tokenizer.image_token_id, video_token_index=tokenizer.video_token_id,
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect, pad_token_id=0,
    )
    _set_attention(config, attn)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _fixed_length_generation(model)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s},
                                                      image_grid_pinpoints=pinpoints)
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(s // patch) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=aspect, chat_template=None,
    )
    return model, processor


def tiny_onevision_inputs(processor, batch: int = 1, sizes: Sizes = ((64, 64),)):
    """LLaVA-OneVision processor outputs: sample ``i`` gets an image of ``sizes[i % len(sizes)]`` (w, h)."""
    return _prompts_with_images(processor, _noise_images(batch, sizes))


#: InternVL's marks: ``<IMG_CONTEXT>`` is each image token, ``<img>`` / ``</img>`` frame an image
INTERNVL_MARKS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def internvl_prompt(text: str) -> str:
    """A LLaVA-style test prompt with InternVL's placeholder (``<IMG_CONTEXT>``) for each ``<image>``."""
    return text.replace("<image>", "<IMG_CONTEXT>")


def tiny_internvl(attn: str = "sdpa", seed: int = 0, layers: int = 4, max_tiles: int = 4):
    """A random ``InternVLForConditionalGeneration`` and its ``InternVLProcessor``.

    Tiles are 96 px at patch 8 (12x12 patches), pixel-shuffled 2x2 into 6x6 = 36 tokens; an image is
    cut into 1 to ``max_tiles`` tiles of the closest aspect ratio, plus a thumbnail when there is more
    than one (a 96x96 or 96x72 image: one tile, 36 tokens; 192x96: 2 tiles + thumbnail, 108).
    """
    tokenizer = word_tokenizer(
        SPECIALS + INTERNVL_MARKS, {"start_image_token": "<img>", "end_image_token": "</img>",
                                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        atomic=tuple(INTERNVL_MARKS),
    )
    s, patch = 96, 8
    per_tile = (s // patch) ** 2 // 4
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=s, patch_size=patch)
    config = InternVLConfig(
        vision_config=vision, text_config=_small_qwen2(len(tokenizer), layers),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=per_tile, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", pad_token_id=0,
    )
    _set_attention(config, attn)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _fixed_length_generation(model)
    image_processor = GotOcr2ImageProcessorPil(size={"height": s, "width": s}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles)
    processor = image_only(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                              image_seq_length=per_tile, chat_template=None)
    return model, processor


def tiny_internvl_inputs(processor, batch: int = 1, sizes: Sizes = ((96, 96),)):
    """InternVL processor outputs: sample ``i`` gets an image of ``sizes[i % len(sizes)]`` (w, h)."""
    return _prompts_with_images(processor, _noise_images(batch, sizes), internvl_prompt)
