"""SparseVLM: text raters score the image tokens at a few decoder layers; dropped tokens are recycled."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ._common import gram, gram_macs, run_parts
from .base import Grids, Reducer, Signals, TokenState, check_layer, top_k_slots, wide
from .registry import register_reducer
from .search import LAST_LAYER, searchable

#: image tokens kept at each sparse layer for each layer-averaged budget (released v1 schedules)
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


@register_reducer(
    "sparsevlm",
    family="pruning",
    placements=("llm",),
    needs=("text_image_attention", "text_relevance"),
    keeps_grid=False,
    cite="Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
    "Inference, ICML 2025",
    code="Gumpest/SparseVLMs, "
    "llava/model/language_model/modelling_sparse_llama.py::LlamaDynamicvitModel.forward "
    "(score.py::attn_postprocess_topk, utils.py::cluster_and_merge), v1 (USE_VERSION=1_0)",
    fidelity="exact (DPC-kNN without the released 1e-6 random noise on densities, which only breaks exact "
    "ties)",
    llm_positions="renumber",
)
@dataclass(frozen=True)
class SparseVLMReducer(Reducer):
    """SparseVLM v1. The text "raters" are the prompt tokens after the image whose relevance to it at the
    decoder input (softmax over the text of image . text, averaged over image tokens) is above the mean.
    The released code runs layers 2, 6 and 15 whole, scores with their own attention and prunes their
    outputs: here that is stages at layers 3, 7 and 16 (``layer`` and ``more_layers``), scored by the
    head-mean attention of the raters at the layer before. Each keeps ``min(count, n - 1)`` image
    tokens, the counts of the schedule for ``budget`` (192: 300, 200, 110); with ``recycle`` the
    ``int(0.3 * dropped) + 1`` best-scored dropped tokens are clustered (DPC-kNN, ``int(m / 10) + 1``
    centres) and each cluster's mean is a new token after the kept ones (in centre order). Positions are
    renumbered.
    """

    layer: int = searchable(3, low=1, high=LAST_LAYER)
    more_layers: str = searchable("7,16", choices=("7,16", ""))
    budget: Literal[64, 96, 128, 192] = searchable(192, choices=(64, 96, 128, 192))
    recycle: bool = searchable(True, choices=(True, False))

    def __post_init__(self) -> None:
        check_layer(self.layer, minimum=1, why="SparseVLM scores tokens with the attention of layer K-1")
        if self.budget not in SCHEDULES:
            raise ValueError(
                f"budget={self.budget!r} must be one of {', '.join(map(str, SCHEDULES))} (paper: 192)"
            )
        layers = self.layers
        if len(layers) > len(SCHEDULES[self.budget]):
            raise ValueError(f"more_layers={self.more_layers!r} gives {len(layers)} sparse layers; the "
                             f"schedule has {len(SCHEDULES[self.budget])}: give at most 2 more layers, "
                             "e.g. '7,16'")

    @property
    def layers(self) -> list[int]:
        try:
            more = [int(t) for t in self.more_layers.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"more_layers={self.more_layers!r} must be comma-separated layer numbers "
                             "such as '7,16' (or '' for one sparse layer)") from None
        layers = [self.layer, *more]
        if any(b <= a for a, b in itertools.pairwise(layers)):
            raise ValueError(f"more_layers={self.more_layers!r} must list layers after layer={self.layer}, "
                             "increasing, e.g. '7,16'")
        return layers

    def substages(self) -> list[Reducer]:
        counts = SCHEDULES[self.budget]
        return [SparseVLMLayer(layer=layer, count=counts[i], recycle=self.recycle)
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
    """One sparse layer of :class:`SparseVLMReducer`: keep ``min(count, n - 1)`` tokens by rater attention
    and (with ``recycle``) merge the best of the dropped ones into tokens placed after the kept ones."""

    layer: int = 3
    count: int = 300
    recycle: bool = True
    name: ClassVar[str] = "sparsevlm"
    family: ClassVar[str] = "pruning"
    placements: ClassVar[tuple[str, ...]] = ("llm",)
    needs: ClassVar[frozenset[str]] = SparseVLMReducer.needs
    keeps_grid: ClassVar[bool] = False
    cite: ClassVar[str] = SparseVLMReducer.cite
    llm_positions: ClassVar[str] = "renumber"

    def _counts(self, n: int) -> tuple[int, int, int]:
        """(kept, recycled, cluster centres) for ``n`` tokens in."""
        k = max(0, min(self.count, n - 1))
        dropped = n - k
        m = min(int(dropped * 0.3) + 1, dropped) if self.recycle and dropped else 0
        return k, m, (int(m / 10) + 1 if m else 0)

    def output_count(self, n: int, grids: Grids) -> int:
        k, _, c = self._counts(n)
        return k + c

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        _, m, _ = self._counts(n)
        return gram_macs(m, dim)  # the recycled tokens' pairwise distances (each pair once)

    @staticmethod
    def score(signals: Signals) -> Tensor:
        """``[N]`` the raters' mean attention to each token (raters: relevance above its mean)."""
        rows = wide(signals.require("text_image_attention"))  # [T, N]
        relevance = signals.require("text_relevance")
        raters = relevance > relevance.mean()
        return rows[raters].mean(dim=0)

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k, m, c = self._counts(state.n)
        device = state.hidden.device
        scores = self.score(signals)
        kept = torch.sort(top_k_slots(scores, k)).values
        target = torch.full((state.n,), -1, dtype=torch.long, device=device)
        target[kept] = torch.arange(k, device=device)
        if not c:
            return state.select(kept)
        dropped = torch.ones(state.n, dtype=torch.bool, device=device)
        dropped[kept] = False
        dropped = torch.nonzero(dropped).flatten()
        recycled = dropped[top_k_slots(scores[dropped], m)]  # best-scored first, as released
        centres, cluster = dpc_knn(state.hidden[recycled], c)
        target[recycled] = k + cluster
        x = wide(state.hidden)
        merged = torch.zeros(c, x.shape[1], dtype=x.dtype, device=device).index_add_(0, cluster, x[recycled])
        merged = merged / (torch.bincount(cluster, minlength=c).to(x.dtype)[:, None] + 1e-6)  # as released
        hidden = torch.cat([x[kept], merged]).to(state.hidden.dtype)
        return state.regroup(target, hidden, torch.cat([kept, recycled[centres]]))


def dpc_knn(x: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density, as SparseVLM's ``cluster_and_merge``.

    Distances are Euclidean over sqrt(width); a token's density is ``exp(-mean squared distance to its
    c nearest tokens, itself included)``; ``delta`` is the distance to the nearest denser token (the
    densest takes the largest distance of all); the ``c`` tokens with the largest ``density * delta``
    are the centres, in that order, and every token joins its nearest centre (a centre itself).

    Returns:
        ``(centres [c], cluster [m])``: the centres' rows, and the cluster (0..c-1) of every row.
    """
    x = wide(x)
    dist = pairwise_distances(x) / x.shape[1] ** 0.5
    near = torch.topk(dist, min(c, x.shape[0]), dim=1, largest=False).values
    density = torch.exp(-(near ** 2).mean(dim=1))
    denser = density[None, :] > density[:, None]
    delta = dist.masked_fill(~denser, float(dist.max())).min(dim=1).values
    centres = top_k_slots(delta * density, c)
    cluster = dist[centres].argmin(dim=0)
    cluster[centres] = torch.arange(c, device=x.device)
    return centres, cluster


def pairwise_distances(x: Tensor) -> Tensor:
    """``[m, m]`` Euclidean distances between the rows of ``x`` (float32 or wider), in ``x``'s dtype.

    The released code subtracts every pair (``m * m * d`` differences); here the squared distance is
    ``|a|^2 + |b|^2 - 2 a.b`` with the product in float64, where the cancellation that makes this form
    inexact in float32 (LLM hidden states carry dimensions in the hundreds) stays below float32's own
    rounding: at 785 rows of 1024 features it is closer to the pairwise differences than ``cdist``'s
    float32 sum and ~10x faster. Devices without float64 (MPS) take ``cdist``'s differences.
    """
    if x.device.type == "mps":
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    y = x.double()
    squared = (y * y).sum(dim=1)
    dist = (squared[:, None] + squared[None, :] - 2.0 * gram(y)).clamp_min_(0.0)
    return dist.fill_diagonal_(0.0).sqrt_().to(x.dtype)
