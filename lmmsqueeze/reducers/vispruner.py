"""VisPruner: important tokens by [CLS] attention, then diverse tokens by iterative duplicate removal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import unit_rows
from .base import Grids, ScoredPruner, Signals, TokenState, resolve_keep, wide
from .registry import register_reducer
from .search import searchable


@register_reducer(
    "vispruner",
    family="pruning",
    placements=("vision",),
    needs=("cls_attention",),
    keeps_grid=False,
    cite="Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning "
    "in VLMs (VisPruner), ICCV 2025",
    code="Theia-4869/VisPruner, llava/model/llava_arch.py::encode_images",
    fidelity="exact (where the released code's odd-sized split indexes past its tensors and fails, the "
    "survivors are taken as the matching describes)",
)
@dataclass(frozen=True)
class VisPrunerReducer(ScoredPruner):
    """Keep ``keep`` tokens: ``int(keep * important)`` of them with the highest [CLS] attention, the rest
    chosen among the others by removing duplicates. The others stay in [CLS]-attention rank order;
    each round splits them alternately into A and B, drops the ``r`` tokens of A most cosine-similar
    to some token of B (at most what the budget allows) and continues with A's survivors, most
    duplicated first, followed by B (paper: important_ratio 0.5, r = 8).

    Runs on the vision features before the projector; similarity is measured on those features, as
    in the paper. Survivors keep their original order.
    """

    keep: int | float = searchable(0.1, low=0.02, high=0.9, log=True)
    important: float = searchable(0.5, low=0.1, high=0.9)
    r: int = searchable(8, low=1, high=16)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.important, bool) or not 0.0 <= self.important <= 1.0:
            raise ValueError(f"important={self.important} must be a fraction in [0, 1] (paper: 0.5)")
        if isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r={self.r} must be an integer >= 1 (duplicates removed per round; paper: 8)")

    def _split(self, n: int) -> tuple[int, int]:
        total = resolve_keep(self.keep, n)
        n_imp = int(total * self.important)
        return n_imp, total - n_imp

    def _rounds(self, rest: int, target: int) -> list[tuple[int, int, int]]:
        """(|A|, |B|, dropped) of every duplicate-removal round."""
        rounds = []
        while target > 0 and rest > target:
            a = (rest + 1) // 2
            drop = min(self.r, rest - target, a)  # a cut beyond A drops all of A
            rounds.append((a, rest // 2, drop))
            rest -= drop
        return rounds

    @staticmethod
    def _once(rest: int, rounds: list[tuple[int, int, int]]) -> bool:
        """Whether one similarity matrix of the ``rest`` candidates takes fewer MACs than the rounds'
        ``A @ B.T`` products."""
        return rest * rest < sum(a * b for a, b, _ in rounds)

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        n_imp, n_div = self._split(n)
        rounds = self._rounds(n - n_imp, n_div)
        rest = n - n_imp
        return (rest * rest if self._once(rest, rounds) else sum(a * b for a, b, _ in rounds)) * dim

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        return signals.require("cls_attention")

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        n_imp, n_div = self._split(state.n)
        if n_imp + n_div >= state.n:
            return state
        ranked = torch.argsort(wide(self.score(state, signals)), descending=True, stable=True)
        important, rest = ranked[:n_imp], ranked[n_imp:]
        x = unit_rows(state.hidden[rest])
        rounds = self._rounds(rest.numel(), n_div)
        # every round's A @ B.T is a block of the candidates' similarity matrix: when the rounds would
        # multiply more than that matrix holds (most budgets), it is computed once; a round then takes
        # B's rows whole (a contiguous gather) and reduces over them, reading each A token's best match
        # as that of its column (the matrix is symmetric); it shrinks to the survivors as they thin out
        similarity = x @ x.T if self._once(rest.numel(), rounds) else None
        order = torch.arange(rest.numel(), device=rest.device)  # rows of `similarity`, in round order
        for _a, _b, drop in rounds:
            a, b = order[0::2], order[1::2]
            if similarity is None:
                duplication = (x[a] @ x[b].T).max(dim=1).values
            else:
                duplication = similarity.index_select(0, b).amax(dim=0).index_select(0, a)
            order = torch.cat([a[torch.argsort(duplication, descending=True, stable=True)[drop:]], b])
            if similarity is not None and order.numel() < 0.8 * similarity.shape[0]:
                similarity = similarity.index_select(0, order).index_select(1, order)
                rest, order = rest[order], torch.arange(order.numel(), device=rest.device)
        return state.select(torch.cat([important, rest[order] if n_div else rest[:0]]))
