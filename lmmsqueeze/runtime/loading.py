"""Loading models offline and building prompts for them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.utils import is_flash_attn_2_available
from transformers.utils import logging as hf_logging

from ..bundled import WEIGHTS_DIR
from ..errors import LmmsqueezeError, ModelError
from ..models import FAMILIES, supported_models
from .dispatch import input_device, load_options
from .threads import configure_threads

#: device kinds a model can be loaded on, and how to tell whether this machine has one
DEVICE_KINDS = {
    "cpu": lambda: 1,
    "cuda": lambda: torch.cuda.device_count() if torch.cuda.is_available() else 0,
    "mps": lambda: 1 if torch.backends.mps.is_available() else 0,
    "xpu": lambda: torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0,
}


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given (checked: a known kind that this machine has), else CUDA when present, else CPU.

    Raises:
        ModelError: an unknown device, or one this machine does not have, with the ones it has.
    """
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = [k if n == 1 and k in ("cpu", "mps") else f"{k} ({k}:0..{k}:{n - 1})" if n > 1 else k
            for k, n in ((k, count()) for k, count in DEVICE_KINDS.items()) if n]
    fix = f"give --device one of: {', '.join(have)}"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelError(f"unknown device {device!r}; {fix}") from None
    if dev.type not in DEVICE_KINDS:
        raise ModelError(f"device {device!r}: lmmsqueeze runs on {', '.join(DEVICE_KINDS)}; {fix}")
    count = DEVICE_KINDS[dev.type]()
    if not count:
        raise ModelError(f"device {device!r} is not available on this machine; {fix}")
    if dev.index is not None and dev.index >= count:
        raise ModelError(f"device {device!r} does not exist: this machine has {count} {dev.type} device(s); "
                         f"{fix}")
    return dev


def attention_backend(device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash-attn is installed, else sdpa."""
    if device.type == "cuda":
        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def model_dir(ref: str | Path) -> Path:
    """The local directory of a model reference: ``"bundled"`` or a directory with a config.json."""
    if str(ref) == "bundled":
        path = Path(WEIGHTS_DIR)
        if not (path / "config.json").is_file():
            raise ModelError(f"the bundled model's weights are missing from {path}; train them with "
                             "`python -m lmmsqueeze.bundled.train`")
        return path
    path = Path(ref)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {str(ref)!r} is not a local model directory (no config.json); give a directory saved "
            "with save_pretrained, or `bundled`"
        )
    return path


def resize_vision(config: Any, image_tokens: int, ref: str | Path) -> int:
    """Set a fixed-resolution (LLaVA) vision tower's input size so that an image gives an
    ``image_tokens`` grid (a square: 144, 576, 1156, 2916, ...). Returns the new image side in pixels."""
    side = math.isqrt(max(image_tokens, 0))
    if image_tokens < 1 or side * side != image_tokens:
        raise LmmsqueezeError(f"image tokens {image_tokens} is not a square grid (n x n tokens); give e.g. "
                              "144, 576, 1156 or 2916")
    if config.model_type != "llava":
        raise ModelError(f"resizing to {image_tokens} image tokens needs a fixed-resolution LLaVA vision "
                         f"tower, but {str(ref)!r} is a {config.model_type!r} model, whose image tokens "
                         "follow the image: give a larger --image instead")
    config.vision_config.image_size = side * config.vision_config.patch_size
    config.image_seq_length = image_tokens
    return config.vision_config.image_size


def load_model(
    ref: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
    image_tokens: int | None = None, device_map: str | dict | None = None,
    max_memory: dict[Any, str] | None = None, offload_folder: str | Path | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` offline from ``"bundled"`` or a local Hugging Face model directory.

    On CUDA the model loads in bfloat16 with flash-attn when it is installed (else sdpa); on CPU in
    float32 with sdpa. ``image_tokens`` (LLaVA; for benchmarks) resizes the vision tower so an image
    gives that many tokens: its position embeddings then start random, every other weight is loaded.
    ``device_map`` (``"auto"`` or a module->device dict), ``max_memory`` and ``offload_folder`` load the
    model across devices (and CPU/disk) through accelerate's big-model inference (the ``dist`` extra):
    :func:`lmmsqueeze.runtime.dispatch.load_options`.
    """
    dev = pick_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    path = model_dir(ref)
    hf_logging.disable_progress_bar()

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {str(ref)!r}: {str(exc).splitlines()[0]}") from None
    if config.model_type not in FAMILIES:
        raise ModelError(
            f"{str(ref)!r} is a {config.model_type!r} model; lmmsqueeze runs {supported_models()}"
        )
    pixels = None if image_tokens is None else resize_vision(config, image_tokens, ref)
    try:
        with _quiet_when(pixels is not None):  # the resized position embeddings are expected to be new
            model = AutoModelForImageTextToText.from_pretrained(
                path, config=config, local_files_only=True, dtype=dtype,
                ignore_mismatched_sizes=pixels is not None, attn_implementation=attention_backend(dev),
                **load_options(device_map, max_memory, offload_folder),
            )
        processor = FAMILIES[config.model_type].load_processor(path)
    except OSError as exc:
        raise ModelError(f"cannot load {str(ref)!r}: {str(exc).splitlines()[0]}") from None
    if pixels is not None:
        processor.image_processor.size = {"shortest_edge": pixels}
        processor.image_processor.crop_size = {"height": pixels, "width": pixels}
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched generation with a decoder-only model needs left padding
    # CPU: deliberate torch threads (runtime/threads.py); a dispatched model stays where accelerate put it
    configure_threads((model if device_map else model.to(dev)).eval())
    return model, processor


@contextlib.contextmanager
def _quiet_when(on: bool) -> Iterator[None]:
    """transformers' loading messages silenced while ``on`` (e.g. the expected newly-initialised weights)."""
    level = hf_logging.get_verbosity()
    if on:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def model_inputs(processor: Any, model: Any, images: list[Any], texts: list[str]) -> Any:
    """Processor outputs for ``texts`` (one prompt per sample; several: a left-padded batch) and their
    ``images``, on the model's device, pixel values in the model's dtype."""
    batch = len(texts) > 1
    try:
        inputs = processor(images=images if batch or len(images) != 1 else images[0],
                           text=texts if batch else texts[0], return_tensors="pt", padding=batch)
    except ValueError as exc:  # e.g. image placeholders that do not match the images
        why = " ".join(str(exc).split())
        raise LmmsqueezeError(f"the model's processor refused the prompt and its {len(images)} image(s): "
                              f"{why[:300]}") from None
    param = next(model.parameters())
    inputs = inputs.to(input_device(model))
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


def build_prompt(processor: Any, text: str) -> str:
    """The prompt for one image and one question: the processor's chat template when it has one,
    else the LLaVA-1.5 format. Text that already holds the image token is used as is."""
    token = getattr(processor, "image_token", "<image>")
    if text.count(token) > 1:
        raise LmmsqueezeError(f"the prompt holds {text.count(token)} {token} placeholders for one image; "
                              f"write the question without {token} (lmmsqueeze places the image) or with one")
    if token in text:
        return text
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    wrapped = {cls.prompt_image for cls in FAMILIES.values()
               if cls.prompt_image and token in cls.prompt_image}
    # e.g. Qwen2-VL: the image sits between vision markers
    token = wrapped.pop() if len(wrapped) == 1 else token
    return f"USER: {token}\n{text} ASSISTANT:"
