"""How a pipeline's measured saving follows its analytic saving as image tokens grow.

For each image-token count the caller's ``make`` gives a model, its processor and an image that
yields that many tokens; :func:`~.measure.bench` then times vanilla and every pipeline interleaved
on it. ``realized`` (measured decoder-time saving over analytic FLOPs saving) should stay near 1 at
every size: a runtime whose gathers, masks or probes grow faster than the work it saves falls
behind as images grow. Each size records how busy the machine was over its measurement
(:class:`~lmmsqueeze.machine.LoadMeter`); only idle rows are worth comparing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..machine import LoadMeter
from ..testing import random_image
from .loading import load_model
from .measure import bench

#: the image-token counts of the README's scaling table (12^2, 24^2 = LLaVA-1.5, 34^2, 54^2)
DEFAULT_TOKENS = (144, 576, 1156, 2916)


def resized(ref: str, device: str | None = None) -> Callable[[int], tuple[Any, Any, Any]]:
    """``make`` for :func:`scaling`: the model at ``ref`` with its vision tower resized to each count
    (see :func:`~.loading.load_model`), and a noise image of the tower's size."""
    def make(tokens: int) -> tuple[Any, Any, Any]:
        model, processor = load_model(ref, device=device, image_tokens=tokens)
        return model, processor, random_image(0, model.config.vision_config.image_size)

    return make


def scaling(make: Callable[[int], tuple[Any, Any, Any]], sizes: list[int], pipelines: list[Any], prompt: str,
            runs: int = 3, warmup: int = 1, weights: Any = None, rss_runs: int = 1, batch: int = 1
            ) -> Iterator[dict[str, Any]]:
    """For each count in ``sizes``: ``{"image_tokens", "machine", "rows"}`` with :func:`bench`'s rows
    (vanilla first) and the load measured over them. Models are built one size at a time."""
    for tokens in sizes:
        model, processor, image = make(tokens)
        with LoadMeter(torch.get_num_threads()) as meter:
            rows = bench(model, processor, pipelines, image, prompt, runs=runs, warmup=warmup,
                         weights=weights, rss_runs=rss_runs, batch=batch)
        del model
        yield {"image_tokens": tokens, "machine": meter.metrics(), "rows": rows}
