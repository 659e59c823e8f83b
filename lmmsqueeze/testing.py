"""Tiny random LLaVA models built from transformers configs, for tests and plugin authors.

Nothing here downloads anything: the tokenizer is a word-level ``tokenizers`` model built in
memory and the image processor is transformers' PIL backend.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

WORDS = (
    "USER ASSISTANT : what is the colour of cell at row column left right top bottom a an "
    "red green blue yellow black white one two three four five six yes no how many ? . , "
    "describe image picture symbol there"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def _word_tokenizer(specials: list[str], extra_special_tokens: dict[str, str], atomic: tuple[str, ...] = ()):
    """A word-level fast tokenizer over ``specials`` + :data:`WORDS`, left padding; ``atomic``
    specials are never split by the punctuation pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
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
    return _word_tokenizer(SPECIALS, {"image_token": "<image>"})


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


def tiny_llava(
    attn: str = "sdpa",
    seed: int = 0,
    image_size: int = 48,
    patch_size: int = 8,
    layers: int = 4,
    strategy: str = "default",
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
):
    """A random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``.

    With the defaults an image gives a 6x6 grid of 36 image tokens and the decoder has 4 layers
    (hidden 64, 4 heads, 2 KV heads: grouped-query attention). Larger shapes (e.g. a
    LLaVA-1.5-like 336 px / patch 14 = 576 tokens) serve benchmarks.
    """
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

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


def random_image(seed: int = 0, size: int = 48) -> Image.Image:
    """A reproducible square RGB noise image."""
    return noise_image(seed, size, size)


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
    a reducer that only runs there)."""
    from .reducers import get_reducer

    params = TINY_STAGE_PARAMS.get(name, "")
    if placement is None:
        placement = "llm" if get_reducer(name).placements == ("llm",) else None
    if placement == "llm" and "layer=" not in params:
        params = ", ".join(p for p in (params, "layer=2") if p)
    return f"{name}({params})" if params else name


def _cdist_flop(x1_shape, x2_shape, *args, **kwargs) -> int:
    """torch's counter has no formula for ``cdist``: its m x n distances over d dimensions are m*n*d
    multiply-adds, like the matrix product it replaces (2 FLOPs each)."""
    *_, m, d = x1_shape
    return 2 * m * x2_shape[-2] * d


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts ``cdist`` (SparseVLM's clustering)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten._cdist_forward: _cdist_flop})


def random_signals(n: int, width: int = 4, text: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                   keys: int = 6):
    """Every signal of :data:`lmmsqueeze.reducers.base.SIGNALS` for ``n`` tokens of ``width`` and ``text``
    prompt tokens after the image (keys ``keys`` wide), drawn from ``seed`` (the shapes the runtime delivers)."""
    from .reducers.base import Signals

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
        cls_attention=rand(n), vision_keys=randn(n, keys), cls_hidden=randn(1, width), last_cls_attention=rand(n),
        last_vision_keys=randn(n, keys),
    )


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter`` counts them (no autograd; ``cdist`` counted)."""
    with torch.no_grad(), flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    """A reproducible RGB noise image of any size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


PROMPTS = (
    "USER: <image>\nwhat is the colour of the cell ? ASSISTANT:",
    "USER: <image>\nhow many ? ASSISTANT:",
    "USER: <image>\ndescribe ASSISTANT:",
)


def tiny_inputs(processor, batch: int = 1, image_size: int = 48):
    """Processor outputs for batch 1, or a left-padded batch of prompts of different lengths."""
    return _prompts_with_images(processor, [random_image(i, image_size) for i in range(batch)])


def _prompts_with_images(processor, images: list[Image.Image]):
    """Sample ``i`` asks ``PROMPTS[i]`` about ``images[i]`` (several samples: a left-padded batch)."""
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    if len(images) == 1:
        return processor(images=images[0], text=texts[0], return_tensors="pt")
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def tiny_llava_next(
    attn: str = "sdpa",
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
):
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


def tiny_next_inputs(processor, batch: int = 1, sizes: tuple[tuple[int, int], ...] = ((64, 64),)):
    """LLaVA-NeXT processor outputs: sample ``i`` gets an image of ``sizes[i % len(sizes)]`` (w, h)."""
    return _prompts_with_images(processor, [noise_image(i, *sizes[i % len(sizes)]) for i in range(batch)])


QWEN_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                 "<|video_pad|>"]


def tiny_qwen_tokenizer():
    """A word-level fast tokenizer with Qwen2-VL's vision markers: ``<|image_pad|>`` is id 4,
    ``<|vision_start|>`` 5, ``<|vision_end|>`` 6, ``<|video_pad|>`` 7."""
    return _word_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                           atomic=tuple(QWEN_SPECIALS))


def tiny_qwen2_vl(
    attn: str = "sdpa",
    seed: int = 0,
    version: str = "2",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
):
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
    ids = dict(image_token_id=4, vision_start_token_id=5, vision_end_token_id=6, video_token_id=7, pad_token_id=0,
               bos_token_id=2, eos_token_id=3)
    if version == "2":
        from transformers import Qwen2VLConfig
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
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
    from .models.qwen2_vl import QwenImageProcessor

    return model, QwenImageProcessor(tokenizer, image_processor)


def tiny_qwen_inputs(processor, batch: int = 1, sizes: tuple[tuple[int, int], ...] = ((168, 168),)):
    """Qwen2-VL inputs: sample ``i`` gets a noise image of ``sizes[i % len(sizes)]`` (w, h)."""
    images = [noise_image(i, *sizes[i % len(sizes)]) for i in range(batch)]
    texts = [qwen_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    return processor(images=images, text=texts if batch > 1 else texts[0], return_tensors="pt")


def qwen_prompt(text: str) -> str:
    """A LLaVA-style test prompt with Qwen2-VL's image placeholder for each ``<image>``."""
    from .models.qwen2_vl import IMAGE_PLACEHOLDER

    return text.replace("<image>", IMAGE_PLACEHOLDER)


def to_device(inputs, device):
    """Processor outputs with every tensor moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()}


def padded_positions(mask):
    """Position ids of a left-padded 2-D attention mask (0 at padding), as ``generate`` builds them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def assert_steps_match(step_logits, logits, rows, prompt: int, atol: float = 1e-4) -> None:
    """Each generated step's logits (``step_logits[step][b]``) equal the no-cache forward's row that
    predicts it: the row whose input column (``rows``, a run's ``output_positions``) is
    ``prompt + step - 1``."""
    for step, expected in enumerate(step_logits):
        for b in range(expected.shape[0]):
            row = int(torch.nonzero(rows[b] == prompt + step - 1))
            diff = float((logits[b, row].float() - expected[b].float()).abs().max())
            assert diff < atol, (step, b, diff)


def miniature_inputs(processor, question: str = "what is the colour of the cell at row one ?"):
    """One 336 px noise image and a LLaVA-1.5 style prompt, as double-precision processor outputs."""
    inputs = processor(images=noise_image(0, 336, 336), text=f"USER: <image>\n{question} ASSISTANT:",
                       return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return inputs


def plan_as_run(run, geometry=None, image: int = 0):
    """The run's plan (compiled for ``geometry``) with every adaptive stage's count the one image
    ``image`` of the last prefill kept."""
    from .compose.plan import compile_pipeline

    plan = run.plan
    kept = run.observed_counts()[image] if run.observed_counts() else []
    observed = {s.index: kept[s.index] for s in plan.stages if s.adaptive}
    return compile_pipeline(plan.canonical, geometry or plan.geometry, observed=observed or None)


def tokens_per_layer_as_run(run, geometry=None) -> list[int]:
    """The image tokens entering each layer by the plan, with every adaptive stage's count the one the
    run's images kept (the largest over the batch's images: what sets the cache length)."""
    per_image = [plan_as_run(run, geometry, i).tokens_per_layer() for i in range(max(1, len(run.observed_counts())))]
    return [max(layer) for layer in zip(*per_image)]
