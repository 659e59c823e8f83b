"""Max pooling over each crop's token grid (the max mode of UniPruneBench's pre-LLM pooling)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Signals, TokenState
from .pool import PoolReducer
from .registry import register_reducer


@register_reducer(
    "maxpool",
    family="pooling",
    placements=("projector",),
    keeps_grid=True,
    cite="Uniform 2x2 max pooling, the max mode of pool_pre_llm in UniPruneBench (Peng et al., arXiv 2511.02650)",
)
@dataclass(frozen=True)
class MaxPoolReducer(PoolReducer):
    """Replace every ``size`` x ``size`` window of each crop's grid by its channel-wise maximum
    (576 -> 144 for 2x2); windows at a ragged border take the maximum of the tokens they hold.

    A pooled token sits at its window's top-left token. Needs an intact grid.
    """

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        target, first, out_grids = self.windows(state)
        index = target[:, None].expand(-1, state.hidden.shape[1])
        hidden = torch.full((first.numel(), state.hidden.shape[1]), float("-inf"), dtype=torch.float32,
                            device=state.hidden.device)
        hidden = hidden.scatter_reduce(0, index, state.hidden.float(), reduce="amax").to(state.hidden.dtype)
        return state.regroup(target, hidden, first, out_grids)
