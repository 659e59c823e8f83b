"""The bundled tiny LLaVA model, trained from scratch on the synthetic benchmark.

``load_bundled()`` returns a real ``LlavaForConditionalGeneration`` (CLIP tower + Llama decoder,
144 image tokens per 96x96 image) and its ``LlavaProcessor``. Single-question inference::

    model, processor = load_bundled()
    inputs = processor(images=image, text=prompt(question), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

Retrain with ``python -m lmmsqueeze.bundled.train``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: one image of the bundled benchmark (96x96 PNG: validation sample 4 of
#: ``lmmsqueeze.evaluation.tasks.bundled.samples("val", 5)``), for ``lmmsqueeze run`` and ``show``; the
#: model answers "what color is the cell with the box" with "yellow"
SAMPLE_IMAGE = Path(__file__).parent / "sample.png"


def prompt(question: str) -> str:
    """The prompt for one question: ``"<image> " + question``.

    The processor expands ``<image>`` into 144 image tokens and prepends ``<s>``; the model
    answers with one word followed by ``</s>``. Equivalent to the processor's chat template
    applied to one user turn holding an image and the question.
    """
    return f"<image> {question}"


def load_bundled(
    device: str | torch.device | None = None, path: str | Path = WEIGHTS_DIR
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load the bundled model (in eval mode, on ``device``, default CPU) and its processor offline."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no bundled weights in {path}; train them with `python -m lmmsqueeze.bundled.train --out {path}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device or "cpu").eval(), processor
