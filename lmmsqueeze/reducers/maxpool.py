"""Max pooling over each crop's token grid (LLaVA-NeXT/OneVision's get_2dPool, max mode)."""

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
    cite="Uniform 2x2 max pooling, as get_2dPool(mm_spatial_pool_mode='max') in "
    "LLaVA-NeXT-Video / LLaVA-OneVision",
    code="LLaVA-VL/LLaVA-NeXT, llava/model/llava_arch.py::get_2dPool (mm_spatial_pool_mode='max')",
    fidelity="exact",
)
@dataclass(frozen=True)
class MaxPoolReducer(PoolReducer):
    """Replace every ``size`` x ``size`` window of each crop's grid by its channel-wise maximum
    (576 -> 144 for 2x2), as ``max_pool2d(size)`` does: a ragged border that fills no whole window is
    dropped. A pooled token sits at its window's top-left token. Needs an intact grid.
    """

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        target, first, out_grids = self.windows(state)
        inside = target >= 0
        index = target[inside][:, None].expand(-1, state.hidden.shape[1])
        hidden = torch.full((first.numel(), state.hidden.shape[1]), float("-inf"), dtype=state.hidden.dtype,
                            device=state.hidden.device)
        hidden = hidden.scatter_reduce(0, index, state.hidden[inside], reduce="amax")
        return state.regroup(target, hidden, first, out_grids)
