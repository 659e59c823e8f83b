"""PruMerge+: [CLS]-attention outliers plus spatial samples, each enriched by its nearest-key tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import unit_rows
from .base import Grids, ScoredPruner, Signals, TokenState, resolve_keep, top_k_slots
from .registry import register_reducer


@register_reducer(
    "prumerge",
    family="merging",
    placements=("vision",),
    needs=("cls_attention", "vision_keys"),
    keeps_grid=False,
    cite="Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models "
    "(PruMerge+), ICCV 2025",
)
@dataclass(frozen=True)
class PruMergeReducer(ScoredPruner):
    """Keep ``keep`` tokens: the [CLS]-attention outliers (above Q3 + 1.5 IQR, best first), then spatially
    uniform samples of the others; each kept token adds the [CLS]-attention-weighted sum of its
    ``neighbors`` most key-cosine-similar other tokens to itself (PruMerge+; paper: about 25% of the
    tokens, 32 neighbours).

    The paper's outlier count is adaptive; a plan needs a fixed count, so ``keep`` is the total and the
    spatial samples fill what the outliers leave (outliers beyond ``keep`` are cut, best first).
    Groups (for traces and sizes) give every pruned token to the kept token it is most similar to
    among those that absorbed it; pruned tokens nobody absorbed are dropped. The released code's
    extra token summarising all pruned tokens is not added. Survivors keep their original order.
    """

    keep: int | float = 0.25
    neighbors: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.neighbors, bool) or self.neighbors < 0:
            raise ValueError(f"neighbors={self.neighbors} must be an integer >= 0 (paper: 32; 0 disables merging)")

    def metric_signal(self) -> str | None:
        return "vision_keys"

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        """``dim`` is the width of the vision keys: (kept x dim) @ (dim x all)."""
        k = resolve_keep(self.keep, n)
        return k * n * dim if self.neighbors and k < n else 0

    def select_slots(self, scores: Tensor, k: int) -> Tensor:
        """The kept slots: outliers by score, then evenly spaced samples of the rest."""
        q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], device=scores.device))
        outliers = torch.nonzero(scores > q3 + 1.5 * (q3 - q1)).flatten()
        outliers = outliers[top_k_slots(scores[outliers], k)]
        rest = torch.ones_like(scores, dtype=torch.bool)
        rest[outliers] = False
        candidates = torch.nonzero(rest).flatten()
        m = k - outliers.numel()
        spaced = torch.div((2 * torch.arange(m, device=scores.device) + 1) * candidates.numel(), 2 * m,
                           rounding_mode="floor") if m else candidates[:0]
        return torch.sort(torch.cat([outliers, candidates[spaced]])).values

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k = self.output_count(state.n, state.grids)
        if k >= state.n:
            return state
        attention = signals.require("cls_attention").float()
        kept = self.select_slots(attention, k)
        device = state.hidden.device
        target = torch.full((state.n,), -1, dtype=torch.long, device=device)
        target[kept] = torch.arange(k, device=device)
        hidden = state.hidden[kept].float()
        nn_count = min(self.neighbors, state.n - 1)
        if nn_count:
            keys = unit_rows(signals.require("vision_keys"))
            similarity = keys[kept] @ keys.T  # [k, N]
            similarity[torch.arange(k, device=device), kept] = float("-inf")  # not itself
            sim, nbr = torch.topk(similarity, nn_count, dim=1)
            hidden = hidden + (state.hidden[nbr].float() * attention[nbr][..., None]).sum(dim=1)
            # groups: a pruned token joins the most similar kept token that absorbed it
            owner_sim = torch.full((state.n,), float("-inf"), device=device)
            owner_sim.scatter_reduce_(0, nbr.flatten(), sim.flatten(), reduce="amax")
            best = (sim == owner_sim[nbr]) & (target[nbr] < 0)
            rows = torch.arange(k, device=device)[:, None].expand_as(nbr)
            owner = torch.full((state.n,), k, dtype=torch.long, device=device)
            owner.scatter_reduce_(0, nbr[best], rows[best], reduce="amin")  # ties: the lowest kept slot
            owner[owner == k] = -1
            pruned = target < 0
            target[pruned] = owner[pruned]
        return state.regroup(target, hidden.to(state.hidden.dtype), kept)
