"""DivPrune: keep a maximally diverse subset (greedy max-min cosine distance)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._common import gram, gram_macs, unit_rows
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
    decoder layer ``layer``); survivors keep their original order. One ``N x N`` similarity matrix
    (each pair multiplied once: :func:`~._common.gram`).
    """

    keep: int | float = searchable(0.098, low=0.02, high=0.9, log=True)
    layer: int | None = searchable(None, low=0, high=LAST_LAYER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer)

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        return gram_macs(n, dim)  # x @ x.T, each pair once

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        n, k = state.n, self.output_count(state.n, state.grids)
        if k >= n:
            return state
        x = unit_rows(state.hidden)
        dist = gram(x).neg_().add_(1.0)  # 1 - cos, in place (negation is exact: the same values)
        # first the token with the largest nearest-neighbour distance (self-distance excluded), then
        # each time the farthest from the picked set; a picked token's distance is set to -inf, so
        # it is never picked again (argmax takes the first of equal values, in numpy and torch alike)
        first = torch.argmax(dist.fill_diagonal_(float("inf")).min(dim=1).values)
        dist.fill_diagonal_(0.0)
        if x.device.type == "cpu":  # k tiny steps: numpy's per-call cost is a fraction of torch's
            return state.select(torch.from_numpy(_greedy(dist.detach().float().numpy(), int(first), k)))
        return state.select(_greedy_on_device(dist, first, k))


def _greedy_on_device(dist: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy max-min picks where ``dist`` lives (no host sync per pick)."""
    picked = torch.empty(k, dtype=torch.long, device=dist.device)
    picked[0] = first
    nearest = dist[first].clone()  # distance of every token to the picked set
    nearest[first] = float("-inf")
    for j in range(1, k):
        picked[j] = torch.argmax(nearest)
        torch.minimum(nearest, dist[picked[j]], out=nearest)
        nearest[picked[j]] = float("-inf")
    return picked


def _greedy(dist: np.ndarray, first: int, k: int) -> np.ndarray:
    """The greedy max-min picks on the host (``dist``: ``[N, N]`` with a zero diagonal)."""
    picked = np.empty(k, dtype=np.int64)
    picked[0] = first
    nearest = dist[first].copy()
    nearest[first] = -np.inf
    for j in range(1, k):
        pick = int(nearest.argmax())
        picked[j] = pick
        np.minimum(nearest, dist[pick], out=nearest)
        nearest[pick] = -np.inf
    return picked

