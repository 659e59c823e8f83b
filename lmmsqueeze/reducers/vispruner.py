"""VisPruner: important tokens by [CLS] attention, then diverse tokens by iterative duplicate removal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._common import gram, gram_macs, unit_rows
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
        return gram_macs(rest, 1) < sum(a * b for a, b, _ in rounds)

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        n_imp, n_div = self._split(n)
        rounds = self._rounds(n - n_imp, n_div)
        rest = n - n_imp
        return gram_macs(rest, dim) if self._once(rest, rounds) else sum(a * b for a, b, _ in rounds) * dim

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
        drops = [drop for *_, drop in rounds]
        # every round's A @ B.T is a block of the candidates' similarity matrix: when the rounds would
        # multiply more than that matrix holds (most budgets), it is computed once and the rounds read it
        if not self._once(rest.numel(), rounds):
            order = _by_products(x, drops)
        elif x.device.type == "cpu":  # hundreds of tiny steps: numpy's per-call cost is a fraction of torch's
            order = torch.from_numpy(_from_neighbours(gram(x), drops)).to(rest.device)
        else:
            order = _from_matrix(gram(x), drops)
        return state.select(torch.cat([important, rest[order] if n_div else rest[:0]]))


#: how many most-similar candidates the host path lists per candidate
NEIGHBOURS = 16


def _by_products(x: Tensor, drops: list[int]) -> Tensor:
    """The rounds as released: each one multiplies its A rows by its B rows. Returns the survivors'
    rows of ``x`` in their final order."""
    order = torch.arange(x.shape[0], device=x.device)
    for drop in drops:
        a, b = order[0::2], order[1::2]
        duplication = (x[a] @ x[b].T).amax(dim=1)
        order = torch.cat([a[torch.argsort(duplication, descending=True, stable=True)[drop:]], b])
    return order


def _from_matrix(similarity: Tensor, drops: list[int]) -> Tensor:
    """The rounds on the candidates' similarity matrix, where it lives: a round takes B's rows whole (a
    contiguous gather) and reduces over them, reading each A token's best match as that of its column
    (the matrix is symmetric); the matrix shrinks to the survivors as they thin out."""
    rest = order = torch.arange(similarity.shape[0], device=similarity.device)
    for drop in drops:
        a, b = order[0::2], order[1::2]
        duplication = similarity.index_select(0, b).amax(dim=0).index_select(0, a)
        order = torch.cat([a[torch.argsort(duplication, descending=True, stable=True)[drop:]], b])
        if order.numel() < 0.8 * similarity.shape[0]:
            similarity = similarity.index_select(0, order).index_select(1, order)
            rest, order = rest[order], torch.arange(order.numel(), device=order.device)
    return rest[order]


def _from_neighbours(similarity: Tensor, drops: list[int]) -> np.ndarray:
    """The rounds on the host, without reading B's rows: every candidate's :data:`NEIGHBOURS` most similar
    candidates are listed once, best first, so an A token's best match in B is the first of its list
    that is in B; only a token with none of its list in B reads its row of the matrix (which shrinks to
    the survivors whenever they halve, so that such rows stay short)."""
    similarity = similarity.detach()
    n = similarity.shape[0]
    listed = similarity.topk(min(NEIGHBOURS, n), dim=1)
    best, near = listed.values.numpy(), listed.indices.numpy()
    starts = np.arange(0, best.size, best.shape[1])  # where each list starts, flattened
    live, where = similarity.numpy(), np.arange(n)  # the survivors' matrix; a candidate's index in it
    order = np.arange(n)
    in_b = np.zeros(n, dtype=bool)
    for drop in drops:
        a, b = order[0::2], order[1::2]
        in_b[:] = False
        in_b[b] = True
        hits = in_b.take(near.take(a, axis=0))
        first = starts[:a.size] + hits.argmax(axis=1)  # each row's first listed B token (its start if none)
        duplication = best.take(a, axis=0).ravel().take(first)
        unlisted = np.flatnonzero(~hits.ravel().take(first))
        if unlisted.size:
            rows = live.take(where.take(a[unlisted]), axis=0)
            duplication[unlisted] = rows.take(where.take(b), axis=1).max(axis=1)
        order = np.concatenate([a[_descending(duplication)[drop:]], b])
        if order.size < live.shape[0] // 2:
            alive = np.sort(order)
            live = live.take(where.take(alive), axis=0).take(where.take(alive), axis=1)
            where[alive] = np.arange(alive.size)
    return order


def _descending(values: np.ndarray) -> np.ndarray:
    """``torch.argsort(values, descending=True, stable=True)`` on the host. For float32, one sort of
    distinct int64 keys (the value's order-preserving integer image, reversed, above the position):
    numpy sorts integers several times faster than it merge-sorts floats stably."""
    if values.dtype != np.float32:
        return np.argsort(-values, kind="stable")  # negation is exact
    bits = (values + np.float32(0.0)).view(np.int32)  # + 0.0: -0.0 ties with 0.0, as in torch
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude, smaller integer
    keys = (~bits).astype(np.int64) << 32  # ~: descending
    keys |= np.arange(values.size)
    keys.sort()
    return keys & 0xFFFFFFFF
