"""PruMerge+: [CLS]-attention outliers plus spatial samples, each enriched by its nearest-key tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import unit_rows
from .base import Grids, ScoredPruner, Signals, TokenState, check_keep, resolve_keep, top_k_slots, wide
from .registry import register_reducer
from .search import searchable

#: the IQR fence of the outlier rule, and the share of outliers PruMerge+ keeps on LLaVA-1.5 on average
#: (about 32 of 576, as its paper reports): the estimate a plan uses before the data decides
FENCE = 1.5
TYPICAL_OUTLIERS = 32 / 576


@register_reducer(
    "prumerge",
    family="merging",
    placements=("vision",),
    needs=("last_cls_attention", "last_vision_keys"),
    keeps_grid=False,
    cite="Shang et al., LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models "
    "(PruMerge+), ICCV 2025",
    code="42Shawn/LLaVA-PruMerge, llava/model/multimodal_encoder/clip_encoder.py::"
    "CLIPVisionTower.token_prune_merge_advanced_plus (if_adaptive=True)",
    fidelity="exact on LLaVA-1.5 (576 tokens, the released lattice's hard-coded 575 is the last index); "
    "approx on Qwen2-VL (no [CLS]: stand-ins) and on LLaVA-NeXT (one "
    "selection over the image's crops)",
)
@dataclass(frozen=True)
class PruMergeReducer(ScoredPruner):
    """PruMerge+ as released: the [CLS] attention of the vision tower's last layer (the released code hooks
    CLIP-L's layer 23; its q and k as one full-width head) picks the outliers above Q3 + 1.5 IQR (best
    first); spatial samples every ``int(int(N / outliers) / 3)`` tokens that are not outliers follow
    (ascending); each kept token adds the [CLS]-attention-weighted sum of the features of its
    ``neighbors`` most key-similar tokens (kept or not); one extra token, the attention-weighted sum of
    every pruned token, comes last (index -1; the pruned tokens are its group). The count depends on the
    image.

    ``keep`` (a departure) fixes the count instead: the outliers, best first and at most ``keep``,
    then evenly spaced samples of the other tokens up to ``keep``.
    """

    keep: int | float | None = None
    neighbors: int = searchable(32, low=4, high=64)

    def __post_init__(self) -> None:
        if self.keep is not None:
            check_keep(self.keep)
        if isinstance(self.neighbors, bool) or self.neighbors < 0:
            raise ValueError(
                f"neighbors={self.neighbors} must be an integer >= 0 (paper: 32; 0 disables merging)"
            )

    @property
    def adaptive(self) -> bool:
        return self.keep is None

    def observed(self, count: int) -> PruMergeReducer:
        """Kept ``count - 1`` tokens and the summary token: planned and costed as that fixed count."""
        return dataclasses.replace(self, keep=count - 1) if self.adaptive and count > 1 else self

    def _kept(self, n: int) -> int:
        """Tokens kept before the extra one: the fixed count, or the estimate of a typical image."""
        if self.keep is not None:
            return resolve_keep(self.keep, n)
        outliers = max(1, int(n * TYPICAL_OUTLIERS))
        step = max(1, int(int(1 / (outliers / n)) / 3))
        return min(n, outliers + len(range(0, n - 1, step)))

    def output_count(self, n: int, grids: Grids) -> int:
        k = self._kept(n)
        return k + 1 if k < n else n

    def metric_signal(self) -> str | None:
        return "last_vision_keys"

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        """``dim`` is the width of the keys: (kept x dim) @ (dim x all)."""
        k = self._kept(n)
        return k * n * dim if self.neighbors and k < n else 0

    def select(self, scores: Tensor) -> Tensor:
        """The kept slots in the released order: outliers by score, then the spatial samples."""
        n = scores.numel()
        single = scores.float()  # the released outlier rule runs in float32
        q1, q3 = torch.quantile(single, torch.tensor([0.25, 0.75], device=scores.device))
        outliers = int((single > q3 + FENCE * (q3 - q1)).sum())
        if self.keep is not None:
            k = resolve_keep(self.keep, n)
            top = top_k_slots(scores, min(outliers, k))
            rest = torch.ones(n, dtype=torch.bool, device=scores.device)
            rest[top] = False
            candidates = torch.nonzero(rest).flatten()
            m = k - top.numel()
            spaced = torch.div((2 * torch.arange(m, device=scores.device) + 1) * candidates.numel(), 2 * m,
                               rounding_mode="floor") if m else candidates[:0]
            return torch.cat([top, candidates[spaced]])
        ratio = outliers / n
        top = top_k_slots(scores, int(n * ratio))
        step = int(int(1 / ratio) / 3) if ratio else n
        lattice = torch.arange(0, n - 1, max(step, 1), device=scores.device)
        return torch.cat([top, lattice[~torch.isin(lattice, top)]])

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        attention = wide(signals.require("last_cls_attention"))
        kept = self.select(attention)
        if kept.numel() >= state.n:
            return state
        device = state.hidden.device
        k = kept.numel()
        pruned = torch.ones(state.n, dtype=torch.bool, device=device)
        pruned[kept] = False
        x = wide(state.hidden)
        hidden = x[kept].clone()
        nn_count = min(self.neighbors, state.n - 1)
        if nn_count:
            keys = unit_rows(signals.require("last_vision_keys"))
            similarity = keys[kept] @ keys.T  # [k, N]
            similarity[torch.arange(k, device=device), kept] = float("-inf")  # not itself
            nbr = torch.topk(similarity, nn_count, dim=1).indices
            hidden = hidden + (x[nbr] * attention[nbr][..., None]).sum(dim=1)
        extra = (x[pruned] * attention[pruned][:, None]).sum(dim=0, keepdim=True)
        target = torch.full((state.n,), k, dtype=torch.long, device=device)  # the pruned: the extra token
        target[kept] = torch.arange(k, device=device)
        representative = torch.cat([kept, torch.full((1,), -1, dtype=torch.long, device=device)])
        return state.regroup(target, torch.cat([hidden, extra]).to(state.hidden.dtype), representative)
