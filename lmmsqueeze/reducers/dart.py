"""DART: pivot tokens by key norm, then the tokens least similar to each pivot (duplicates dropped)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import unit_rows
from .base import Grids, ScoredPruner, Signals, TokenState, check_layer, resolve_keep, top_k_slots
from .registry import register_reducer


@register_reducer(
    "dart",
    family="pruning",
    placements=("llm",),
    needs=("llm_keys",),
    keeps_grid=False,
    cite="Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication "
    "Matters More (DART), EMNLP 2025",
)
@dataclass(frozen=True)
class DARTReducer(ScoredPruner):
    """At decoder layer ``layer`` keep ``keep`` image tokens: ``pivots`` pivot tokens with the largest
    L1 norm of their layer K-1 keys, then, pivot by pivot, an equal share of the remaining budget
    taken as the not-yet-chosen tokens with the lowest cosine similarity to that pivot
    (paper: K=2, reduction 0.778 so 128 of 576 kept, 4 image + 4 text pivots).

    No attention weights are needed. Two approximations: the runtime measures keys of image
    tokens only, so all pivots are image tokens (the paper adds 4 text pivots); and similarity is
    computed on the raw input of layer K (the paper passes it through the model's final RMSNorm,
    whose per-channel weight changes cosines slightly). Survivors keep their original positions.
    """

    keep: int | float = 0.222
    layer: int = 2
    pivots: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer, minimum=1, why="DART reads the keys of layer K-1")
        if isinstance(self.pivots, bool) or self.pivots < 1:
            raise ValueError(f"pivots={self.pivots} must be an integer >= 1 (paper: 4 image pivots)")

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        k = resolve_keep(self.keep, n)
        return min(self.pivots, k) * n * dim if k < n else 0  # pivots @ x.T

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k = self.output_count(state.n, state.grids)
        if k >= state.n:
            return state
        n_piv = min(self.pivots, k)
        pivots = top_k_slots(signals.require("llm_keys").float().abs().sum(dim=1), n_piv)
        x = unit_rows(state.hidden)
        similarity = x[pivots] @ x.T  # [pivots, N]
        chosen = torch.zeros(state.n, dtype=torch.bool, device=x.device)
        chosen[pivots] = True
        share, extra = divmod(k - n_piv, n_piv)
        for p in range(n_piv):
            take = share + (1 if p < extra else 0)
            if take:
                picks = top_k_slots(-similarity[p].masked_fill(chosen, float("inf")), take)
                chosen[picks] = True
        return state.select(torch.nonzero(chosen).flatten())
