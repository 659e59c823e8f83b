"""Benchmark tasks: the registry the evaluation runner and the CLI read (``--task NAME``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ...errors import LmmsqueezeError
from . import bundled


@dataclass(frozen=True)
class Task:
    """A question-answering benchmark over images.

    ``samples(split, n, seed)`` returns objects with ``image``, ``question``, ``answer``, ``qtype``
    and ``uid``; ``score(prediction, answer)`` is the metric of one sample (0..1);
    ``summarize(rows of (qtype, score))`` gives ``{"overall", "per_type", "n"}``.
    """

    name: str
    description: str
    metric: str
    size: int
    max_new_tokens: int
    samples: Callable[[str, int, int], list[Any]]
    score: Callable[[str, str], float]
    summarize: Callable[[Iterable[tuple[str, float]]], dict]


def _bundled() -> Task:
    return Task(
        name="bundled",
        description="synthetic fine-detail VQA on 12x12-cell images "
                    "(colour, existence, row, column of a symbol)",
        metric="exact_match",
        size=bundled.TEST_SIZE,
        max_new_tokens=3,
        samples=lambda split, n, seed: bundled.samples(split, n, seed),
        score=bundled.score,
        summarize=bundled.summarize,
    )


TASKS: dict[str, Callable[[], Task]] = {"bundled": _bundled}


def get_task(name: str) -> Task:
    """A task by name; a one-line error lists the known ones."""
    try:
        return TASKS[name]()
    except KeyError:
        raise LmmsqueezeError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "get_task"]
