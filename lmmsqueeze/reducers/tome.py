"""ToMe: bipartite soft matching, merging the most similar pairs (size-weighted), applied once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ._common import unit_rows, weighted_means
from .base import Grids, ScoredPruner, Signals, TokenState, check_layer, resolve_keep, wide
from .registry import register_reducer
from .search import LAST_LAYER, searchable


@register_reducer(
    "tome",
    family="merging",
    placements=("vision", "projector", "llm"),
    needs=("vision_keys",),
    keeps_grid=False,
    cite="Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023",
    code="facebookresearch/ToMe, tome/merge.py::bipartite_soft_matching, merge_wavg "
    "(tome/patch/timm.py for the head-mean key metric)",
    fidelity="approx: the released code merges r tokens inside every ViT block (with proportional "
    "attention); here the same matching and size-weighted merge run at one placement, in rounds until keep "
    "remain (at the default keep=0.5 one round: exactly the released matching)",
)
@dataclass(frozen=True)
class ToMeReducer(ScoredPruner):
    """Merge tokens by bipartite soft matching until ``keep`` remain: split the tokens alternately
    into A (even slots) and B (odd slots), match every A token to its most cosine-similar B token,
    and merge the best-matched A tokens into their partners as size-weighted means; one round
    merges at most half the tokens, so a budget below one half takes several rounds. Output order
    is ToMe's: the unmerged A tokens (best match first), then every B token.

    ``metric=keys`` compares the vision tower's keys averaged over heads (the paper's metric; in later
    rounds the merged keys are size-weighted means, normalised again), ``metric=hidden`` the tokens'
    own hidden states. Runs on the vision features (default) or at the input of decoder layer
    ``layer``. A merged token takes the position of its B token.
    """

    keep: int | float = searchable(0.5, low=0.02, high=0.9, log=True)
    metric: Literal["keys", "hidden"] = searchable("keys", choices=("keys", "hidden"))
    layer: int | None = searchable(None, low=0, high=LAST_LAYER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer)

    @staticmethod
    def _rounds(n: int, k: int) -> list[tuple[int, int, int]]:
        """(|A|, |B|, merged) of every round from ``n`` down to ``k`` tokens."""
        rounds = []
        while n > k and n >= 2:
            r = min(n - k, n // 2)
            rounds.append(((n + 1) // 2, n // 2, r))
            n -= r
        return rounds

    def metric_signal(self) -> str | None:
        return "vision_keys" if self.metric == "keys" else None

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        """``dim`` is the width of the metric (vision keys for ``metric=keys``): A @ B.T per round."""
        return sum(a * b * dim for a, b, _ in self._rounds(n, resolve_keep(self.keep, n)))

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k = self.output_count(state.n, state.grids)
        metric = signals.require("vision_keys") if self.metric == "keys" else state.hidden
        metric = wide(metric)
        for _a, _b, r in self._rounds(state.n, k):
            state, metric = _merge_round(state, metric, r)
        return state


def _merge_round(state: TokenState, metric: torch.Tensor, r: int) -> tuple[TokenState, torch.Tensor]:
    """One bipartite round: the ``r`` A tokens with the best matches merge into their B partners; the
    output is the unmerged A tokens in match order, then the B tokens."""
    n, device = state.n, state.hidden.device
    a, b = torch.arange(0, n, 2, device=device), torch.arange(1, n, 2, device=device)
    x = unit_rows(metric)
    best, partner = (x[a] @ x[b].T).max(dim=1)
    order = torch.sort(best, descending=True, stable=True).indices
    merged, unmerged = order[:r], order[r:]
    m = unmerged.numel() + b.numel()
    target = torch.empty(n, dtype=torch.long, device=device)
    target[a[unmerged]] = torch.arange(unmerged.numel(), device=device)
    target[b] = unmerged.numel() + torch.arange(b.numel(), device=device)
    target[a[merged]] = target[b[partner[merged]]]
    hidden = weighted_means(target, state.hidden, state.sizes, m).to(state.hidden.dtype)
    new_metric = weighted_means(target, metric, state.sizes, m)
    return state.regroup(target, hidden, torch.cat([a[unmerged], b])), new_metric
