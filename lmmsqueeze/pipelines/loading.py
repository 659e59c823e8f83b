"""Loading models offline and building prompts for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_backend(device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash-attn is installed, else sdpa."""
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def load_model(ref: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load ``(model, processor)`` offline from ``"bundled"`` or a local Hugging Face model directory.

    On CUDA the model loads in bfloat16 with flash-attn when it is installed (else sdpa); on CPU in
    float32 with sdpa.
    """
    dev = pick_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if str(ref) == "bundled":
        from ..bundled import WEIGHTS_DIR

        path = Path(WEIGHTS_DIR)
    else:
        path = Path(ref)
    if str(ref) == "bundled" and not (path / "config.json").is_file():
        raise ModelError(f"the bundled model's weights are missing from {path}; train them with "
                         "`python -m lmmsqueeze.bundled.train`")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {str(ref)!r} is not a local model directory (no config.json); give a directory saved with "
            "save_pretrained, or `bundled`"
        )
    from transformers import (
        AutoConfig,
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    families = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if config.model_type not in families:
        raise ModelError(f"{str(ref)!r} is a {config.model_type!r} model; lmmsqueeze runs LLaVA and LLaVA-NeXT models")
    try:
        model = families[config.model_type].from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=attention_backend(dev)
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise ModelError(f"cannot load {str(ref)!r}: {str(exc).splitlines()[0]}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched generation with a decoder-only model needs left padding
    return model.to(dev).eval(), processor


def build_prompt(processor: Any, text: str) -> str:
    """The prompt for one image and one question: the processor's chat template when it has one,
    else the LLaVA-1.5 format. Text that already holds ``<image>`` is used as is."""
    token = getattr(processor, "image_token", "<image>")
    if token in text:
        return text
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: {token}\n{text} ASSISTANT:"
