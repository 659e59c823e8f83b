"""VisPruner: important tokens by [CLS] attention, then diverse tokens by iterative duplicate removal."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import unit_rows
from .base import Grids, ScoredPruner, Signals, TokenState, resolve_keep, top_k_slots
from .registry import register_reducer


@register_reducer(
    "vispruner",
    family="pruning",
    placements=("vision",),
    needs=("cls_attention",),
    keeps_grid=False,
    cite="Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning "
    "in VLMs (VisPruner), ICCV 2025",
)
@dataclass(frozen=True)
class VisPrunerReducer(ScoredPruner):
    """Keep ``keep`` tokens: the fraction ``important`` of them with the highest [CLS] attention, the rest
    chosen among the others by removing duplicates: split the remaining tokens alternately into A
    and B, drop the ``r`` tokens of A most cosine-similar to some token of B, repeat until the budget
    is met (paper: important_ratio 0.5, r = 8).

    Runs on the vision features before the projector; similarity is measured on those features, as
    in the paper. Survivors keep their original order.
    """

    keep: int | float = 0.1
    important: float = 0.5
    r: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.important, bool) or not 0.0 <= self.important <= 1.0:
            raise ValueError(f"important={self.important} must be a fraction in [0, 1] (paper: 0.5)")
        if isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r={self.r} must be an integer >= 1 (duplicates removed per round; paper: 8)")

    def _split(self, n: int) -> tuple[int, int]:
        total = resolve_keep(self.keep, n)
        n_imp = min(total, math.floor(total * self.important + 0.5))
        return n_imp, total - n_imp

    def _rounds(self, rest: int, target: int) -> list[tuple[int, int, int]]:
        """(|A|, |B|, dropped) of every duplicate-removal round."""
        rounds = []
        while rest > target:
            a, b = (rest + 1) // 2, rest // 2
            drop = min(self.r, rest - target, a)
            rounds.append((a, b, drop))
            rest -= drop
        return rounds

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        n_imp, n_div = self._split(n)
        if n_div == 0:
            return 0
        return sum(a * b * dim for a, b, _ in self._rounds(n - n_imp, n_div))  # A @ B.T per round

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        return signals.require("cls_attention")

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        n_imp, n_div = self._split(state.n)
        if n_imp + n_div >= state.n:
            return state
        device = state.hidden.device
        important = top_k_slots(self.score(state, signals), n_imp)
        rest_mask = torch.ones(state.n, dtype=torch.bool, device=device)
        rest_mask[important] = False
        rest = torch.nonzero(rest_mask).flatten()
        if n_div == 0:
            rest = rest[:0]
        x = unit_rows(state.hidden)
        for _a, _b, drop in self._rounds(rest.numel(), n_div):
            a, b = rest[0::2], rest[1::2]
            duplication = (x[a] @ x[b].T).max(dim=1).values
            gone = a[top_k_slots(duplication, drop)]
            rest = rest[~torch.isin(rest, gone)]
        return state.select(torch.cat([important, rest]))
