"""Tiny random models of every supported family, built from transformers configs, for tests and plugin
authors; the family table the tests run their contract over; and the independent references (flop
counter, no-cache forward) they compare against.

Nothing here downloads anything: tokenizers are built in memory and images are noise.

- :mod:`.tiny`: tokenizers, noise images, prompts, moving and growing processor outputs.
- :mod:`.builders`: a tiny random model and processor of every family, and their inputs.
- :mod:`.families`: :data:`TINY_FAMILIES`, one :class:`TinyFamily` row per family.
- :mod:`.checks`: the flop counter, ``assert_steps_match``, a run's plan as it ran.
"""

from .builders import (
    internvl_prompt,
    tiny_inputs,
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
from .checks import (
    DecoderInputs,
    assert_cache_follows_plan,
    assert_steps_match,
    count_flops,
    flop_counter,
    plan_as_run,
    tokens_per_layer_as_run,
)
from .families import TINY_FAMILIES, TINY_STAGE_PARAMS, Counts, TinyFamily, tiny_pipeline
from .tiny import (
    PROMPTS,
    QWEN_SPECIALS,
    SPECIALS,
    WORDS,
    grown_inputs,
    miniature_inputs,
    noise_image,
    padded_positions,
    placeholder_ids,
    qwen_prompt,
    random_image,
    random_signals,
    tiny_qwen_tokenizer,
    tiny_tokenizer,
    to_device,
)

__all__ = [
    "PROMPTS",
    "QWEN_SPECIALS",
    "SPECIALS",
    "TINY_FAMILIES",
    "TINY_STAGE_PARAMS",
    "WORDS",
    "Counts",
    "DecoderInputs",
    "TinyFamily",
    "assert_cache_follows_plan",
    "assert_steps_match",
    "count_flops",
    "flop_counter",
    "grown_inputs",
    "internvl_prompt",
    "miniature_inputs",
    "noise_image",
    "padded_positions",
    "placeholder_ids",
    "plan_as_run",
    "qwen_prompt",
    "random_image",
    "random_signals",
    "tiny_inputs",
    "tiny_internvl",
    "tiny_internvl_inputs",
    "tiny_llava",
    "tiny_llava_inputs",
    "tiny_llava_next",
    "tiny_next_inputs",
    "tiny_onevision",
    "tiny_onevision_inputs",
    "tiny_pipeline",
    "tiny_qwen2_vl",
    "tiny_qwen3_vl",
    "tiny_qwen_inputs",
    "tiny_qwen_tokenizer",
    "tiny_tokenizer",
    "to_device",
    "tokens_per_layer_as_run",
]
