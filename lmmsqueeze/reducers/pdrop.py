"""PyramidDrop: at the end of several LLM stages, rank the image tokens with the next layer's own
attention."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import Tensor

from ._common import run_parts
from .base import Grids, ScoredPruner, Signals, TokenState, check_layer
from .registry import register_reducer
from .search import LAST_LAYER, searchable


@register_reducer(
    "pdrop",
    family="pruning",
    placements=("llm",),
    needs=("input_text_attention",),
    keeps_grid=False,
    cite="Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid "
    "Visual Redundancy Reduction, CVPR 2025",
    code="Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py::LlamaModel.pdrop_rank_drop",
    fidelity="exact (counts are int(n0 * keep^i) for keep = 1/m, the default 0.5 included; for other keep "
    "each stage floors its own input's fraction, which can differ from the released count by one)",
    llm_positions="renumber",
)
@dataclass(frozen=True)
class PDropReducer(ScoredPruner):
    """At decoder layers ``layer``, ``layer + step``, ... (``stages`` of them) keep the fraction ``keep``
    of the image tokens left (``int``, rounding down), ranked by the head-mean attention of the last
    instruction token to them, computed from the input of that layer with its own input norm, q/k
    projections and RoPE (paper: layers 8, 16, 24 and lambda = 0.5, so 576 -> 288 -> 144 -> 72).
    The released code renumbers positions after every drop (``positions=renumber``).
    """

    keep: float = searchable(0.5, low=0.1, high=0.9)
    layer: int = searchable(8, low=1, high=LAST_LAYER)
    step: int = searchable(8, low=1, high=8)
    stages: int = searchable(3, low=1, high=4)

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or math.isnan(self.keep) \
                or not 0.0 < self.keep <= 1.0:
            raise ValueError(
                f"keep={self.keep!r} must be the fraction kept at each stage, in (0, 1] (paper: 0.5)"
            )
        check_layer(self.layer, minimum=1, why="PyramidDrop drops between layers")
        if isinstance(self.step, bool) or self.step < 1:
            raise ValueError(f"step={self.step} must be an integer >= 1 (layers between drops; paper: 8)")
        if isinstance(self.stages, bool) or self.stages < 1:
            raise ValueError(f"stages={self.stages} must be an integer >= 1 (paper: 3)")

    def substages(self) -> list[PDropReducer] | None:
        if self.stages == 1:
            return None
        return [dataclasses.replace(self, layer=self.layer + i * self.step, stages=1)
                for i in range(self.stages)]

    def output_count(self, n: int, grids: Grids) -> int:
        for _ in range(self.stages):
            n = max(1, int(n * float(self.keep)))
        return n

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        return signals.require("input_text_attention")

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        parts = self.substages()
        if parts:
            return run_parts(parts, state, signals)
        return super().reduce(state, signals)
