"""SparseVLM: text raters score the image tokens at a few decoder layers; dropped tokens are recycled."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ._common import run_parts, weighted_means
from .base import Grids, Reducer, Signals, TokenState, check_layer, resolve_keep, top_k_slots
from .registry import register_reducer

#: image tokens kept at each sparse layer, out of 576, for each layer-averaged budget (released code)
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
RECYCLE_FRACTION = 0.3  # of the dropped tokens, the best-scored 30% are recycled
KNN = 5  # neighbours defining a token's density in DPC-kNN


@register_reducer(
    "sparsevlm",
    family="pruning",
    placements=("llm",),
    needs=("text_image_attention",),
    keeps_grid=False,
    cite="Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
    "Inference, ICML 2025",
)
@dataclass(frozen=True)
class SparseVLMReducer(Reducer):
    """At decoder layers ``layer`` and ``more_layers`` keep the image tokens most attended by the text
    "raters" (the prompt tokens after the image that attend to the image more than average), with
    the per-layer counts of the paper's schedule for ``budget``; with ``recycle`` the best-scored 30%
    of each layer's dropped tokens are clustered (DPC-kNN, m/10 + 1 centres) and merged into extra
    tokens placed after the kept ones.

    Paper defaults: layers 2, 6, 15 and budget 192, i.e. 300 -> 200 -> 110 of 576 tokens (plus the
    recycled ones). The schedule is applied as fractions, so other token counts scale with it.
    Approximation: the paper picks raters by the similarity of text and image embeddings before the
    LLM; here they are picked by their attention mass on the image at layer K-1 (the same head-mean
    attention rows that score the tokens). Survivors keep their original positions; a recycled
    token takes its cluster centre's.
    """

    layer: int = 2
    more_layers: str = "6,15"
    budget: Literal[64, 96, 128, 192] = 192
    recycle: bool = True

    def __post_init__(self) -> None:
        check_layer(self.layer, minimum=1, why="SparseVLM scores tokens with the attention of layer K-1")
        if self.budget not in SCHEDULES:
            raise ValueError(f"budget={self.budget!r} must be one of {', '.join(map(str, SCHEDULES))} (paper: 192)")
        layers = self.layers
        if len(layers) > len(SCHEDULES[self.budget]):
            raise ValueError(f"more_layers={self.more_layers!r} gives {len(layers)} sparse layers; the schedule "
                             f"has {len(SCHEDULES[self.budget])}: give at most 2 more layers, e.g. '6,15'")

    @property
    def layers(self) -> list[int]:
        try:
            more = [int(t) for t in self.more_layers.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"more_layers={self.more_layers!r} must be comma-separated layer numbers such as "
                             "'6,15' (or '' for one sparse layer)") from None
        layers = [self.layer, *more]
        if any(b <= a for a, b in itertools.pairwise(layers)):
            raise ValueError(f"more_layers={self.more_layers!r} must list layers after layer={self.layer}, "
                             "increasing, e.g. '6,15'")
        return layers

    def substages(self) -> list[Reducer]:
        counts = (576, *SCHEDULES[self.budget])
        return [SparseVLMLayer(layer=layer, keep=counts[i + 1] / counts[i], recycle=self.recycle)
                for i, layer in enumerate(self.layers)]

    def output_count(self, n: int, grids: Grids) -> int:
        for part in self.substages():
            n = part.output_count(n, None)
        return n

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        total = 0
        for part in self.substages():
            total += part.cost_macs(n, dim, None)
            n = part.output_count(n, None)
        return total

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        return run_parts(self.substages(), state, signals)


@dataclass(frozen=True)
class SparseVLMLayer(Reducer):
    """One sparse layer of :class:`SparseVLMReducer`: keep the fraction ``keep`` of the tokens it
    receives by rater attention, and (with ``recycle``) merge the best of the dropped ones."""

    layer: int = 2
    keep: float = 1.0
    recycle: bool = True
    name: ClassVar[str] = "sparsevlm"
    family: ClassVar[str] = "pruning"
    placements: ClassVar[tuple[str, ...]] = ("llm",)
    needs: ClassVar[frozenset[str]] = frozenset({"text_image_attention"})
    keeps_grid: ClassVar[bool] = False
    cite: ClassVar[str] = SparseVLMReducer.cite

    def _counts(self, n: int) -> tuple[int, int, int]:
        """(kept, recycled, cluster centres) for ``n`` tokens in."""
        k = resolve_keep(self.keep, n)
        m = math.floor(RECYCLE_FRACTION * (n - k) + 0.5) if self.recycle else 0
        return k, m, (m // 10 + 1 if m else 0)

    def output_count(self, n: int, grids: Grids) -> int:
        k, _, c = self._counts(n)
        return k + c

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        _, m, _ = self._counts(n)
        return m * m * dim if m > 1 else 0  # x @ x.T over the recycled tokens

    def score(self, signals: Signals) -> Tensor:
        rows = signals.require("text_image_attention").float()  # [T, N]
        if rows.shape[0] == 0:
            return torch.zeros(rows.shape[1], device=rows.device)
        mass = rows.sum(dim=1)
        raters = mass > mass.mean()
        return rows[raters].mean(dim=0) if bool(raters.any()) else rows.mean(dim=0)

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k, m, c = self._counts(state.n)
        if k >= state.n:
            return state
        device = state.hidden.device
        scores = self.score(signals)
        order = top_k_slots(scores, k + m)  # the kept tokens, then the best-scored dropped ones
        kept = torch.sort(order[:k]).values
        target = torch.full((state.n,), -1, dtype=torch.long, device=device)
        target[kept] = torch.arange(k, device=device)
        if not c:
            return state.select(kept)
        recycled = order[k:k + m]
        centres, cluster = dpc_knn(state.hidden[recycled], c)
        target[recycled] = k + cluster
        merged = weighted_means(target, state.hidden, state.sizes, k + c)[k:]
        hidden = torch.cat([state.hidden[kept].float(), merged]).to(state.hidden.dtype)
        return state.regroup(target, hidden, torch.cat([kept, recycled[centres]]))


def dpc_knn(x: Tensor, c: int, knn: int = KNN) -> tuple[Tensor, Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (as in TCFormer).

    Density ``rho_i = exp(-mean squared distance to the k nearest neighbours)``; ``delta_i`` = distance
    to the nearest token of higher density (ties broken by lower index; the densest token takes
    its largest distance); the ``c`` tokens with the largest ``rho * delta`` are the centres and every
    token joins its nearest centre. Distances are Euclidean over sqrt(width).

    Returns:
        ``(centres [c], cluster [m])``: the centres' rows, and the cluster (0..c-1) of every row.
    """
    m = x.shape[0]
    x = x.float()
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0) / x.shape[1]
    d2.fill_diagonal_(0.0)
    dist = d2.sqrt()
    k = min(knn, m - 1)
    if k == 0:
        return torch.zeros(1, dtype=torch.long, device=x.device), torch.zeros(m, dtype=torch.long, device=x.device)
    near = torch.topk(d2, k + 1, dim=1, largest=False).values[:, 1:]  # drop the self-distance
    rho = torch.exp(-near.mean(dim=1))
    idx = torch.arange(m, device=x.device)
    higher = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    delta = dist.masked_fill(~higher, float("inf")).min(dim=1).values
    top = ~higher.any(dim=1)
    delta[top] = dist[top].max(dim=1).values
    centres = torch.sort(top_k_slots(rho * delta, c)).values
    cluster = dist[:, centres].argmin(dim=1)
    cluster[centres] = torch.arange(c, device=x.device)
    return centres, cluster
