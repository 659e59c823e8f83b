"""Uniform spatial subsampling: every ``stride``-th token of every ``stride``-th row."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Grids, Reducer, Signals, TokenState
from .registry import register_reducer
from .search import searchable


@register_reducer(
    "stride",
    family="pooling",
    placements=("projector",),
    keeps_grid=True,
    cite="Uniform token subsampling: every stride-th token of every stride-th row of each crop's grid "
    "(a no-signal baseline; not image downsampling, which re-encodes a smaller image)",
    code="",
    fidelity="baseline: no released code; the rule is its definition",
)
@dataclass(frozen=True)
class StrideReducer(Reducer):
    """Keep the tokens at rows and columns ``0, stride, 2*stride, ...`` of each crop's grid and drop the
    rest (stride 2 keeps 25%, 3 keeps 11.1%, 4 keeps 6.25%); the survivors form a
    ``ceil(h/stride) x ceil(w/stride)`` grid. Needs an intact grid.
    """

    stride: int = searchable(2, low=2, high=4)
    requires_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.stride, bool) or self.stride < 1:
            raise ValueError(
                f"stride={self.stride} must be an integer >= 1 (2 keeps every other row and column)"
            )

    def check_input(self, n: int, grids: Grids) -> None:
        for h, w in grids or ():
            if self.stride > min(h, w):
                raise ValueError(f"stride={self.stride} is larger than the {h}x{w} token grid this stage "
                                 f"receives; give stride <= {min(h, w)}")

    def output_grids(self, grids: Grids) -> Grids:
        if grids is None:
            raise ValueError("stride needs the token grid, but an earlier stage broke it")
        return tuple((math.ceil(h / self.stride), math.ceil(w / self.stride)) for h, w in grids)

    def output_count(self, n: int, grids: Grids) -> int:
        return sum(h * w for h, w in self.output_grids(grids))

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        device = state.hidden.device
        kept, start = [], 0
        for h, w in state.grids:
            rows = torch.arange(0, h, self.stride, device=device)
            cols = torch.arange(0, w, self.stride, device=device)
            kept.append(start + (rows[:, None] * w + cols[None, :]).flatten())
            start += h * w
        return dataclasses.replace(state.select(torch.cat(kept)), grids=self.output_grids(state.grids))
