"""PyramidDrop: FastV-style ranking repeated at the end of several LLM stages, a ratio per stage."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import Tensor

from ._common import run_parts
from .base import Grids, ScoredPruner, Signals, TokenState, check_layer, resolve_keep
from .registry import register_reducer


@register_reducer(
    "pdrop",
    family="pruning",
    placements=("llm",),
    needs=("text_attention",),
    keeps_grid=False,
    cite="Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid "
    "Visual Redundancy Reduction, CVPR 2025",
)
@dataclass(frozen=True)
class PDropReducer(ScoredPruner):
    """At decoder layers ``layer``, ``layer + step``, ... (``stages`` of them) keep the fraction ``keep``
    of the image tokens left, ranked by the head-mean attention of the last instruction token.

    Paper default: layers 8, 16, 24 with lambda = 0.5, so 576 -> 288 -> 144 -> 72 image tokens.
    The paper recomputes that attention with the projections of the layer where it drops; here
    every stage reads the one-query probe of the layer before it (``layer - 1``), as FastV does.
    Survivors keep their original positions (the paper renumbers them).
    """

    keep: float = 0.5
    layer: int = 8
    step: int = 8
    stages: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or math.isnan(self.keep) \
                or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep={self.keep!r} must be the fraction kept at each stage, in (0, 1] (paper: 0.5)")
        check_layer(self.layer, minimum=1, why="PyramidDrop ranks tokens with the attention of layer K-1")
        if isinstance(self.step, bool) or self.step < 1:
            raise ValueError(f"step={self.step} must be an integer >= 1 (layers between drops; paper: 8)")
        if isinstance(self.stages, bool) or self.stages < 1:
            raise ValueError(f"stages={self.stages} must be an integer >= 1 (paper: 3)")

    def substages(self) -> list[PDropReducer] | None:
        if self.stages == 1:
            return None
        return [dataclasses.replace(self, layer=self.layer + i * self.step, stages=1) for i in range(self.stages)]

    def output_count(self, n: int, grids: Grids) -> int:
        for _ in range(self.stages):
            n = resolve_keep(float(self.keep), n)
        return n

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        return signals.require("text_attention")

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        parts = self.substages()
        if parts:
            return run_parts(parts, state, signals)
        return super().reduce(state, signals)
