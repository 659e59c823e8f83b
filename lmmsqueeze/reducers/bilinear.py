"""Bilinear resizing of each crop's token grid (LLaVA-OneVision's frame pooling)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._common import bilinear_grids
from .base import Grids, Reducer, Signals, TokenState
from .registry import register_reducer
from .search import searchable


@register_reducer(
    "bilinear",
    family="pooling",
    placements=("projector",),
    keeps_grid=True,
    cite="Bilinear grid resize, as get_2dPool(mode='bilinear') in LLaVA-OneVision "
    "(Li et al., arXiv 2408.03326)",
    code="LLaVA-VL/LLaVA-NeXT, llava/model/llava_arch.py::get_2dPool (mm_spatial_pool_mode='bilinear')",
    fidelity="exact",
)
@dataclass(frozen=True)
class BilinearReducer(Reducer):
    """Resize every crop's ``h x w`` token grid to ``side x side`` (or, without ``side``, to
    ``ceil(h * scale) x ceil(w * scale)``) by bilinear interpolation with half-pixel centres and no
    antialiasing, as ``F.interpolate(mode="bilinear")``. LLaVA-OneVision halves each side
    (27x27 -> 14x14), the default here (LLaVA-1.5: 24x24 -> 12x12).

    Downsizing only. Output token (i, j) groups the input tokens whose row falls in
    ``floor(r * out_h / h) == i`` (and likewise for columns) and sits at the first of them.
    Needs an intact grid.
    """

    scale: float = searchable(0.5, low=0.2, high=0.9)
    side: int | None = None
    requires_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))
                or not 0.0 < self.scale <= 1.0):
            raise ValueError(f"scale={self.scale!r} must be in (0, 1] (0.5 halves each side of the grid)")
        if self.side is not None and (isinstance(self.side, bool) or self.side < 1):
            raise ValueError(f"side={self.side} must be an integer >= 1 (the output grid is side x side)")

    def _size(self, h: int, w: int) -> tuple[int, int]:
        if self.side is not None:
            return self.side, self.side
        return math.ceil(h * self.scale - 1e-9), math.ceil(w * self.scale - 1e-9)

    def output_grids(self, grids: Grids) -> Grids:
        if grids is None:
            raise ValueError("bilinear needs the token grid, but an earlier stage broke it")
        for h, w in grids:
            if self.side is not None and self.side > min(h, w):
                raise ValueError(f"side={self.side} is larger than the {h}x{w} token grid; "
                                 f"give side <= {min(h, w)} (bilinear only downsizes)")
        return tuple(self._size(h, w) for h, w in grids)

    def output_count(self, n: int, grids: Grids) -> int:
        return sum(h * w for h, w in self.output_grids(grids))

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        out_grids = self.output_grids(state.grids)
        hidden, target = bilinear_grids(state.hidden, state.grids, out_grids)
        device = state.hidden.device
        first = torch.full((hidden.shape[0],), state.n, dtype=torch.long, device=device)
        first.scatter_reduce_(0, target, torch.arange(state.n, device=device), reduce="amin")
        return state.regroup(target, hidden, first, out_grids)

