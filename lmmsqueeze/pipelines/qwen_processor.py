"""An image-only processor for Qwen2-VL-family models.

``Qwen2VLProcessor`` also builds a video processor, which needs torchvision; lmmsqueeze does not
depend on torchvision, so when ``AutoProcessor`` cannot load a Qwen2-VL directory,
:func:`~lmmsqueeze.pipelines.loading.load_model` falls back to this class. It prepares images and
text exactly as ``Qwen2VLProcessor`` does for images: the image processor gives ``pixel_values``
and ``image_grid_thw``, every ``<|image_pad|>`` in the text becomes one ``<|image_pad|>`` per
merged patch of its image, and ``mm_token_type_ids`` marks those tokens with 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

#: what a prompt holds for one image
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class QwenImageProcessor:
    """``processor(images=..., text=..., return_tensors="pt", padding=...)`` for Qwen2-VL models."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "QwenImageProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path, **kwargs), AutoImageProcessor.from_pretrained(path, **kwargs))

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def __call__(self, images: Any = None, text: Any = None, return_tensors: str = "pt", padding: bool = False,
                 **kwargs: Any) -> Any:
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif isinstance(images, Image.Image):
            images = [images]
        else:  # one list per sample or a flat list, as Qwen2VLProcessor accepts
            images = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        data: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            data.update(self.image_processor(images=images, return_tensors=return_tensors))
            counts = (data["image_grid_thw"].prod(-1) // self.merge_size ** 2).tolist()
        wanted = sum(t.count(self.image_token) for t in texts)
        if wanted != len(counts):
            raise ValueError(f"the text holds {wanted} {self.image_token} placeholders but {len(counts)} images "
                             f"were given; put {IMAGE_PLACEHOLDER} once per image in the text")
        pending = iter(counts)
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            expanded.append(parts[0] + "".join(self.image_token * next(pending) + p for p in parts[1:]))
        enc = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding or len(texts) > 1)
        data.update(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.chat_template, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)
