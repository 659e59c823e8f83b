"""One-shot greedy answering, shared by the CLI's `run` and the evaluation runner."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import LmmsqueezeError
from .loading import build_prompt, load_model, model_inputs
from .run import prepare

#: the largest image lmmsqueeze opens (pixels): 40 megapixels, e.g. 8000 x 5000; models see a few
#: hundred pixels a side, and a larger file is more likely a mistake (or a decompression bomb)
MAX_IMAGE_PIXELS = 40_000_000


def open_image(path: str | Path) -> Image.Image:
    """The RGB image in ``path``; a file that is not an image, is damaged, or holds more than
    :data:`MAX_IMAGE_PIXELS` pixels is refused with one line."""
    p = Path(path)
    if p.is_dir():
        raise LmmsqueezeError(f"image {str(p)!r} is a directory; give an image file (PNG, JPEG, ...)")
    limit = f"lmmsqueeze's limit of {MAX_IMAGE_PIXELS // 1_000_000} megapixels (MAX_IMAGE_PIXELS)"
    fix = "downscale it first, e.g. to 2048 pixels on the long side"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(p)
            w, h = image.size
            if w * h > MAX_IMAGE_PIXELS:
                raise LmmsqueezeError(f"image {str(p)!r} is {w}x{h} ({w * h / 1e6:.0f} megapixels), over "
                                      f"{limit}; {fix}")
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise LmmsqueezeError(f"image {str(p)!r} is over {limit}; {fix}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise LmmsqueezeError(f"cannot read image {str(p)!r} ({why[:200]}); give a PNG or JPEG file"
                              ) from None


@torch.no_grad()
def generate_answer(model: Any, processor: Any, image: Image.Image, question: str, pipeline: Any,
                    max_new_tokens: int = 32, weights: Any = None) -> dict[str, Any]:
    """Greedy answer of ``model`` with ``pipeline`` (and its trained ``weights``) installed, plus what
    the pipeline did."""
    inputs = model_inputs(processor, model, [image], [build_prompt(processor, question)])
    with prepare(model, pipeline, weights).apply() as run:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    return {
        "answer": processor.decode(new_tokens, skip_special_tokens=True).strip(),
        "pipeline": run.plan.canonical,
        "image_tokens_per_layer": run.image_tokens_per_layer,
        "kept_per_stage": [len(t[0]) for t in run.trace] if run.trace else [],
    }


def answer(model_ref: str, image_path: str | Path, question: str, pipeline: Any, max_new_tokens: int = 32,
           device: str | None = None, weights: str | None = None) -> dict[str, Any]:
    """Load a model and answer one question about one image file (with trained ``weights``, e.g. a
    ProxyV adapter: the pipeline they were trained for when ``pipeline`` is empty)."""
    model, processor = load_model(model_ref, device=device)
    return generate_answer(model, processor, open_image(image_path), question, pipeline, max_new_tokens,
                           weights)
