"""Average pooling over each crop's token grid (LLaVA-NeXT/OneVision's get_2dPool, average mode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._common import weighted_means
from .base import Grids, Reducer, Signals, TokenState
from .registry import register_reducer
from .search import searchable


@register_reducer(
    "pool",
    family="pooling",
    placements=("projector",),
    keeps_grid=True,
    cite="Uniform 2x2 average pooling, as get_2dPool in LLaVA-NeXT-Video / LLaVA-OneVision",
    code="LLaVA-VL/LLaVA-NeXT, llava/model/llava_arch.py::get_2dPool (mm_spatial_pool_mode='average')",
    fidelity="exact",
)
@dataclass(frozen=True)
class PoolReducer(Reducer):
    """Average every ``size`` x ``size`` window of each crop's grid into one token (576 -> 144 for 2x2),
    as ``avg_pool2d(size)`` does: windows tile the grid from its top-left corner and a ragged border
    that fills no whole window is dropped (27x27 -> 13x13). A pooled token sits at its window's top-left
    token. Needs an intact grid.
    """

    size: int = searchable(2, low=2, high=4)
    requires_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"size={self.size} must be an integer >= 1 (2 pools 2x2 windows)")

    def output_grids(self, grids: Grids) -> Grids:
        if grids is None:
            raise ValueError(f"{self.name} needs the token grid, but an earlier stage broke it")
        for h, w in grids:
            if min(h, w) < self.size:
                raise ValueError(
                    f"size={self.size} is larger than the {h}x{w} token grid; give size <= {min(h, w)}"
                )
        return tuple((h // self.size, w // self.size) for h, w in grids)

    def output_count(self, n: int, grids: Grids) -> int:
        return sum(h * w for h, w in self.output_grids(grids))

    def windows(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor, Grids]:
        """Each current token's window (new slot; -1 on a dropped border), each window's top-left slot,
        and the pooled grids."""
        out_grids = self.output_grids(state.grids)
        device = state.hidden.device
        targets, offset = [], 0
        for (h, w), (oh, ow) in zip(state.grids, out_grids, strict=True):
            rows = torch.arange(h, device=device).repeat_interleave(w) // self.size
            cols = torch.arange(w, device=device).repeat(h) // self.size
            inside = (rows < oh) & (cols < ow)
            targets.append(torch.where(inside, offset + rows * ow + cols, -1))
            offset += oh * ow
        target = torch.cat(targets)
        inside = target >= 0
        first = torch.full((offset,), state.n, dtype=torch.long, device=device)
        first.scatter_reduce_(0, target[inside], torch.arange(state.n, device=device)[inside], reduce="amin")
        return target, first, out_grids

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        target, first, out_grids = self.windows(state)
        ones = torch.ones(state.n, device=state.hidden.device)
        hidden = weighted_means(target, state.hidden, ones, first.numel()).to(state.hidden.dtype)
        return state.regroup(target, hidden, first, out_grids)
