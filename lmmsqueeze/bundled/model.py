"""Build the bundled tiny LLaVA (CLIP tower + Llama decoder), its tokenizer and processor offline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from lmmsqueeze.evaluation.tasks.bundled import CELL, GRID, IMAGE_SIZE, vocabulary

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
IMAGE_TOKENS = GRID * GRID
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }} "
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image> {{ '' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }} {% endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}</s> {% endif -%}"
    "{%- endfor -%}"
)
"""Renders a user turn as ``<image> question`` and closes assistant turns with ``</s>``."""


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the bundled model; the defaults are the shipped ones."""

    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 256
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 6
    text_mlp: int = 512
    rope_theta: float = 10000.0
    max_positions: int = 1024


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the benchmark vocabulary; prepends ``<s>``, ``<image>`` is special."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_processor() -> LlavaProcessor:
    """``LlavaProcessor`` expanding ``<image>`` into 144 tokens, with a PIL-only CLIP image processor."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: TinyConfig = TinyConfig(), seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` of the given sizes."""
    vocab_size = len(SPECIAL_TOKENS) + len(vocabulary())
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=CELL,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.do_sample = False
    return model


def pixels(images: np.ndarray) -> torch.Tensor:
    """``(B, 96, 96, 3)`` uint8 arrays -> normalised ``(B, 3, 96, 96)`` floats, as the processor does."""
    x = torch.tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std
