"""The small pieces every tiny model shares: in-memory word-level tokenizers, reproducible noise images,
the test prompts, and helpers that move, pad and grow processor outputs.

Nothing here downloads anything: the tokenizers are ``tokenizers`` word-level models built in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..models.qwen2_vl import IMAGE_PLACEHOLDER
from ..reducers.base import Signals

WORDS = (
    "USER ASSISTANT : what is the colour of cell at row column left right top bottom a an "
    "red green blue yellow black white one two three four five six yes no how many ? . , "
    "describe image picture symbol there"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
QWEN_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                 "<|video_pad|>"]

#: the prompts of a test batch: sample ``i`` asks ``PROMPTS[i % 3]`` (different lengths: left padding)
PROMPTS = (
    "USER: <image>\nwhat is the colour of the cell ? ASSISTANT:",
    "USER: <image>\nhow many ? ASSISTANT:",
    "USER: <image>\ndescribe ASSISTANT:",
)


def word_tokenizer(specials: list[str], extra_special_tokens: dict[str, str], atomic: tuple[str, ...] = ()):
    """A word-level fast tokenizer over ``specials`` + :data:`WORDS`, left padding; ``atomic``
    specials are never split by the punctuation pre-tokenizer."""
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    split = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    if atomic:
        tok.add_special_tokens(list(atomic))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=extra_special_tokens,
    )
    fast.padding_side = "left"
    return fast


def tiny_tokenizer():
    """A word-level fast tokenizer with ``<image>`` as a special token (id 4)."""
    return word_tokenizer(SPECIALS, {"image_token": "<image>"})


def tiny_qwen_tokenizer():
    """A word-level fast tokenizer with Qwen2-VL's vision markers: ``<|image_pad|>`` is id 4,
    ``<|vision_start|>`` 5, ``<|vision_end|>`` 6, ``<|video_pad|>`` 7."""
    return word_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                           atomic=tuple(QWEN_SPECIALS))


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    """A reproducible RGB noise image of any size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_image(seed: int = 0, size: int = 48) -> Image.Image:
    """A reproducible square RGB noise image."""
    return noise_image(seed, size, size)


def qwen_prompt(text: str) -> str:
    """A LLaVA-style test prompt with Qwen2-VL's image placeholder for each ``<image>``."""
    return text.replace("<image>", IMAGE_PLACEHOLDER)


def miniature_inputs(processor, question: str = "what is the colour of the cell at row one ?"):
    """One 336 px noise image and a LLaVA-1.5 style prompt, as double-precision processor outputs."""
    inputs = processor(images=noise_image(0, 336, 336), text=f"USER: <image>\n{question} ASSISTANT:",
                       return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return inputs


def to_device(inputs, device):
    """Processor outputs with every tensor moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}


def placeholder_ids(model) -> list[int]:
    """Tokens a random model must never generate: an image (or video) placeholder without its features
    (a prompt with generated tokens is fed again as one no-cache prompt). Pass as ``suppress_tokens``."""
    config = model.config
    ids = (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
    return [int(i) for i in ids if i is not None]


def padded_positions(mask):
    """Position ids of a left-padded 2-D attention mask (0 at padding), as ``generate`` builds them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def grown_inputs(inputs: Any, sequences: torch.Tensor) -> dict[str, Any]:
    """The prompt plus generated tokens (``sequences``, as ``generate`` returns them), as a no-cache
    forward of the whole sequence takes them: the attention mask grows by ones; M-RoPE families
    (``mm_token_type_ids``) get text-typed columns and compute their positions themselves, the others
    get ``generate``'s left-padded position ids."""
    extra = sequences.shape[1] - inputs["input_ids"].shape[1]
    mask = inputs["attention_mask"]
    ones = torch.ones(sequences.shape[0], extra, dtype=mask.dtype, device=mask.device)
    grown = {**inputs, "input_ids": sequences, "attention_mask": torch.cat([mask, ones], 1)}
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        grown["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(ones, dtype=types.dtype)], 1)
    else:
        grown["position_ids"] = padded_positions(grown["attention_mask"])
    return grown


def random_signals(n: int, width: int = 4, text: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                   keys: int = 6):
    """Every signal of :data:`lmmsqueeze.reducers.base.SIGNALS` for ``n`` tokens of ``width`` and ``text``
    prompt tokens after the image (keys ``keys`` wide), drawn from ``seed`` (the shapes the runtime
    delivers)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return Signals(
        text_attention=rand(n), text_image_attention=rand(text, n), input_text_attention=rand(n),
        llm_keys=randn(n, keys), text_keys=randn(text, keys), normed_hidden=randn(n, width),
        text_normed_hidden=randn(text, width), sequence_index=torch.arange(5, 5 + n),
        text_sequence_index=torch.arange(5 + n, 5 + n + text), text_relevance=rand(text),
        cls_attention=rand(n), vision_keys=randn(n, keys), cls_hidden=randn(1, width),
        last_cls_attention=rand(n), last_vision_keys=randn(n, keys),
    )
