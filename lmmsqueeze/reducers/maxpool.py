"""Max pooling over each crop's token grid (the max mode of UniPruneBench's pre-LLM pooling)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Grids, Reducer, Signals, TokenState
from .registry import register_reducer


@register_reducer(
    "maxpool",
    family="pooling",
    placements=("projector",),
    keeps_grid=True,
    cite="Uniform 2x2 max pooling, the max mode of pool_pre_llm in UniPruneBench (Peng et al., arXiv 2511.02650)",
)
@dataclass(frozen=True)
class MaxPoolReducer(Reducer):
    """Replace every ``size`` x ``size`` window of each crop's grid by its channel-wise maximum
    (576 -> 144 for 2x2); windows at a ragged border take the maximum of the tokens they hold.

    A pooled token sits at its window's top-left token. Needs an intact grid.
    """

    size: int = 2
    requires_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"size={self.size} must be an integer >= 1 (2 pools 2x2 windows)")

    def output_grids(self, grids: Grids) -> Grids:
        if grids is None:
            raise ValueError("maxpool needs the token grid, but an earlier stage broke it")
        return tuple((math.ceil(h / self.size), math.ceil(w / self.size)) for h, w in grids)

    def output_count(self, n: int, grids: Grids) -> int:
        return sum(h * w for h, w in self.output_grids(grids))

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        out_grids = self.output_grids(state.grids)
        device = state.hidden.device
        targets, offset = [], 0
        for (h, w), (oh, ow) in zip(state.grids, out_grids):
            rows = torch.arange(h, device=device).repeat_interleave(w) // self.size
            cols = torch.arange(w, device=device).repeat(h) // self.size
            targets.append(offset + rows * ow + cols)
            offset += oh * ow
        target = torch.cat(targets)
        index = target[:, None].expand(-1, state.hidden.shape[1])
        hidden = torch.full((offset, state.hidden.shape[1]), float("-inf"), dtype=torch.float32, device=device)
        hidden = hidden.scatter_reduce(0, index, state.hidden.float(), reduce="amax").to(state.hidden.dtype)
        first = torch.full((offset,), state.n, dtype=torch.long, device=device)
        first.scatter_reduce_(0, target, torch.arange(state.n, device=device), reduce="amin")
        return state.regroup(target, hidden, first, out_grids)
