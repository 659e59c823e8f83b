"""FastV: drop the image tokens the last prompt token attends to least, once, at layer K."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import ScoredPruner, Signals, TokenState, check_layer
from .registry import register_reducer
from .search import LAST_LAYER, searchable


@register_reducer(
    "fastv",
    family="pruning",
    placements=("llm",),
    needs=("text_attention",),
    keeps_grid=False,
    cite="Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024",
    code="pkunlp-icler/FastV, "
    "src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py::"
    "LlamaModel.forward (fastv_config)",
    fidelity="exact",
)
@dataclass(frozen=True)
class FastVReducer(ScoredPruner):
    """Keep the ``keep`` image tokens with the highest head-mean attention from the last prompt token
    at decoder layer ``layer - 1``; the rest are dropped from layer ``layer`` on (paper: K=2, R=50%).
    Survivors keep their original positions.
    """

    keep: int | float = searchable(0.5, low=0.02, high=0.9, log=True)
    layer: int = searchable(2, low=1, high=LAST_LAYER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer, minimum=1, why="FastV scores tokens with the attention of layer K-1")

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        return signals.require("text_attention")
