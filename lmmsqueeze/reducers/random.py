"""Random pruning: the baseline every paper should beat (and many do not)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import ScoredPruner, Signals, TokenState, check_layer
from .registry import register_reducer
from .search import LAST_LAYER, searchable


@register_reducer(
    "random",
    family="pruning",
    placements=("projector", "llm"),
    keeps_grid=False,
    cite="Uniform random subset; the baseline of UniPruneBench (arXiv 2511.02650) and FastV with K=0",
    code="",
    fidelity="baseline: no released code; a seeded uniform subset (torch.rand from seed, top keep)",
)
@dataclass(frozen=True)
class RandomReducer(ScoredPruner):
    """Keep a uniformly random subset of ``keep`` tokens, drawn from ``seed`` (same seed, same tokens).

    Runs before the LLM by default, or at the input of decoder layer ``layer``.
    """

    keep: int | float = searchable(0.5, low=0.02, high=0.9, log=True)
    seed: int = 0
    layer: int | None = searchable(None, low=0, high=LAST_LAYER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer)
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(state.n, generator=generator).to(state.hidden.device)
