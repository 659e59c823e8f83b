"""DivPrune: keep a maximally diverse subset (greedy max-min cosine distance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import unit_rows
from .base import Grids, ScoredPruner, Signals, TokenState, check_layer
from .registry import register_reducer
from .search import LAST_LAYER, searchable


@register_reducer(
    "divprune",
    family="pruning",
    placements=("projector", "llm"),
    keeps_grid=False,
    cite="Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, "
    "CVPR 2025",
    code="vbdi/divprune, LLaVA/llava/model/llava_arch.py::DivPrune (LAYER_INDEX=0, SUBSET_RATIO=0.098)",
    fidelity="exact at the projector placement (layer=K, a departure, runs the same selection on the hidden "
    "states entering decoder layer K)",
)
@dataclass(frozen=True)
class DivPruneReducer(ScoredPruner):
    """Greedily solve the max-min diversity problem on cosine distance ``1 - cos(x_i, x_j)``: the first
    pick is the token farthest from its nearest neighbour, each next pick the token whose distance
    to the picked set is largest, until ``keep`` tokens (paper: 0.098 of the tokens, 56 of 576).

    Works on the tokens' own hidden states (projected features by default, or the input of
    decoder layer ``layer``); survivors keep their original order. One ``N x N`` similarity matrix.
    """

    keep: int | float = searchable(0.098, low=0.02, high=0.9, log=True)
    layer: int | None = searchable(None, low=0, high=LAST_LAYER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer)

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        return n * n * dim  # x @ x.T

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        n, k = state.n, self.output_count(state.n, state.grids)
        if k >= n:
            return state
        x = unit_rows(state.hidden)
        dist = 1.0 - x @ x.T
        # picks stay on the device (no host sync per pick): first the token with the largest
        # nearest-neighbour distance (self-distance excluded), then the farthest from the picked set
        picked = torch.empty(k, dtype=torch.long, device=x.device)
        picked[0] = torch.argmax(dist.fill_diagonal_(float("inf")).min(dim=1).values)
        dist.fill_diagonal_(0.0)
        nearest = dist[picked[0]].clone()  # distance of every token to the picked set
        chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
        chosen[picked[0]] = True
        for j in range(1, k):
            picked[j] = torch.argmax(nearest.masked_fill(chosen, float("-inf")))
            chosen[picked[j]] = True
            nearest = torch.minimum(nearest, dist[picked[j]])
        return state.select(picked)

