"""The objects every reducer reads and returns: :class:`TokenState`, :class:`Signals`, :class:`Reducer`.

A reducer is a small frozen dataclass whose fields are its parameters. It maps one sample's (or
one image's) visual tokens, carried in a :class:`TokenState`, plus the signals it declared in
``needs``, to a new :class:`TokenState`. It never sees a model, a hook or the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

Grid = tuple[int, int]
Grids = tuple[Grid, ...] | None

PLACEMENTS = ("vision", "projector", "llm", "proxyv")
FAMILIES = ("pruning", "merging", "pooling", "proxy")

#: Signals the runtime knows how to provide. A reducer lists the ones it reads in ``needs``;
#: each arrives aligned with the slots of the state it is given.
SIGNALS = {
    "text_attention": "[N] head-mean attention of the last prompt token to each image token at decoder "
    "layer K-1 (llm placement)",
    "text_image_attention": "[T, N] head-mean attention of each prompt token after the image to each image "
    "token at decoder layer K-1 (llm placement)",
    "llm_keys": "[N, d_kv] key projections (before RoPE) of the image tokens at decoder layer K-1 (llm placement)",
    "cls_attention": "[N] head-mean attention of the vision tower's [CLS] token to each patch at the vision "
    "feature layer (any placement)",
    "vision_keys": "[N, d_vision] key projections of each patch at the vision feature layer (any placement)",
}
LLM_SIGNALS = frozenset({"text_attention", "text_image_attention", "llm_keys"})
VISION_SIGNALS = frozenset({"cls_attention", "vision_keys"})


@dataclass(frozen=True)
class TokenState:
    """The visual tokens of one sample (or one image) at one point of a pipeline.

    Attributes:
        hidden: ``[N, D]`` hidden states of the current tokens.
        index: ``[N]`` original index (``0..n_original-1``) of each token; for a merged token, the
            index of its representative. Positions and the trace are derived from it.
        sizes: ``[N]`` how many original tokens each current token stands for (1 for untouched tokens).
        crop_ids: ``[N]`` crop (or image) each token belongs to.
        grids: ``(h, w)`` of every crop in crop-id order while the tokens are a full row-major grid
            per crop; ``None`` once a stage broke that order.
        assign: ``[n_original]`` the current slot of every original token, ``-1`` if it was dropped.
            Merged tokens share a slot, so ``assign`` gives the merge groups.
    """

    hidden: Tensor
    index: Tensor
    sizes: Tensor
    crop_ids: Tensor
    grids: Grids
    assign: Tensor

    @classmethod
    def initial(cls, hidden: Tensor, grids: Grids = None, crop_ids: Tensor | None = None) -> "TokenState":
        """The state of untouched tokens: every token is its own original, one slot each."""
        n = hidden.shape[0]
        device = hidden.device
        index = torch.arange(n, device=device)
        if crop_ids is None:
            crop_ids = torch.zeros(n, dtype=torch.long, device=device)
        if grids is not None and sum(h * w for h, w in grids) != n:
            raise ValueError(f"grids {grids} hold {sum(h * w for h, w in grids)} tokens, but there are {n}")
        return cls(hidden, index, torch.ones(n, device=device), crop_ids, grids, index.clone())

    @classmethod
    def concat(cls, states: list["TokenState"], crops: list[int], device: torch.device | None = None) -> "TokenState":
        """The states of several images as one (a sample's): original indices, slots and crop ids are
        offset by the images before; ``crops[i]`` is the number of crop ids of image ``i``. The grid
        survives only when every image still has one."""
        if not states:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return cls(torch.empty(0, 0, device=device), empty, torch.empty(0, device=device), empty, None, empty)
        index, assign, crop_ids, index_off, slot_off, crop_off = [], [], [], 0, 0, 0
        for s, c in zip(states, crops):
            index.append(s.index + index_off)
            assign.append(torch.where(s.assign >= 0, s.assign + slot_off, s.assign))
            crop_ids.append(s.crop_ids + crop_off)
            index_off, slot_off, crop_off = index_off + s.n_original, slot_off + s.n, crop_off + c
        grids = None if any(s.grids is None for s in states) else tuple(g for s in states for g in s.grids)
        return cls(torch.cat([s.hidden for s in states]), torch.cat(index), torch.cat([s.sizes for s in states]),
                   torch.cat(crop_ids), grids, torch.cat(assign))

    @property
    def n(self) -> int:
        """Number of current tokens."""
        return int(self.hidden.shape[0])

    @property
    def n_original(self) -> int:
        return int(self.assign.shape[0])

    def crop_slices(self) -> list[slice]:
        """Slices of the current tokens that belong to each crop, valid while ``grids`` is set."""
        if self.grids is None:
            raise ValueError("the token order is no longer a grid (an earlier stage broke it)")
        out, start = [], 0
        for h, w in self.grids:
            out.append(slice(start, start + h * w))
            start += h * w
        return out

    def select(self, keep: Tensor) -> "TokenState":
        """Keep the tokens at slots ``keep`` (any order; the result is in slot order).

        The grid survives only when every token is kept.
        """
        keep = torch.sort(keep.to(torch.long).flatten()).values
        if keep.numel() and (keep[1:] == keep[:-1]).any():
            raise ValueError("select() got duplicate slots")
        new_slot = torch.full((self.n,), -1, dtype=torch.long, device=self.index.device)
        new_slot[keep] = torch.arange(keep.numel(), device=keep.device)
        intact = keep.numel() == self.n
        return TokenState(
            hidden=self.hidden[keep],
            index=self.index[keep],
            sizes=self.sizes[keep],
            crop_ids=self.crop_ids[keep],
            grids=self.grids if intact else None,
            assign=_remap(self.assign, new_slot),
        )

    def regroup(self, target: Tensor, hidden: Tensor, representative: Tensor, grids: Grids = None) -> "TokenState":
        """Merge or drop tokens: current slot ``i`` goes to new slot ``target[i]`` (``-1`` drops it).

        Args:
            target: ``[N]`` new slot of every current token, or -1.
            hidden: ``[M, D]`` hidden states of the new tokens.
            representative: ``[M]`` the current slot whose original index a new token takes
                (its position); it must itself be mapped to that new token.
            grids: the grid of the new tokens, if they form one.
        """
        target = target.to(torch.long)
        m = hidden.shape[0]
        if representative.shape[0] != m:
            raise ValueError(f"{m} new tokens but {representative.shape[0]} representatives")
        if not torch.equal(target[representative], torch.arange(m, device=target.device)):
            raise ValueError("every representative must be mapped to the token it represents")
        alive = target >= 0
        sizes = torch.zeros(m, dtype=self.sizes.dtype, device=self.sizes.device)
        sizes.index_add_(0, target[alive], self.sizes[alive])
        return TokenState(
            hidden=hidden,
            index=self.index[representative],
            sizes=sizes,
            crop_ids=self.crop_ids[representative],
            grids=grids,
            assign=_remap(self.assign, target),
        )

    def with_hidden(self, hidden: Tensor) -> "TokenState":
        """The same tokens with other hidden states (e.g. read at another layer)."""
        if hidden.shape[0] != self.n:
            raise ValueError(f"expected {self.n} hidden states, got {hidden.shape[0]}")
        return TokenState(hidden, self.index, self.sizes, self.crop_ids, self.grids, self.assign)


def _remap(assign: Tensor, new_slot: Tensor) -> Tensor:
    out = torch.full_like(assign, -1)
    alive = assign >= 0
    out[alive] = new_slot[assign[alive]]
    return out


@dataclass
class Signals:
    """What the runtime measured for the tokens of one state, aligned with its slots.

    Only the signals a reducer lists in ``needs`` are filled in (see :data:`SIGNALS`); reading
    another raises.
    """

    text_attention: Tensor | None = None
    text_image_attention: Tensor | None = None
    llm_keys: Tensor | None = None
    cls_attention: Tensor | None = None
    vision_keys: Tensor | None = None

    def require(self, name: str) -> Tensor:
        value = getattr(self, name, None)
        if value is None:
            raise RuntimeError(f"signal {name!r} was not provided: add it to the reducer's `needs`")
        return value


def check_keep(value: int | float, name: str = "keep") -> None:
    """Refuse a token budget that is neither a count (int >= 1) nor a fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number: a count (integer >= 1) or a fraction in (0, 1]")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{name}={value} is not finite; give a fraction in (0, 1] or a count >= 1")
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"{name}={value} is a float outside (0, 1]; give a fraction in (0, 1] "
                f"or an integer count such as {name}={max(1, round(value))}"
            )
    elif value < 1:
        raise ValueError(f"{name}={value} keeps no token; give a count >= 1 or a fraction in (0, 1]")


def resolve_keep(value: int | float, n: int) -> int:
    """Number of tokens a budget keeps out of ``n``: a count as is, a fraction rounded half up (>= 1)."""
    if isinstance(value, float):
        return max(1, min(n, math.floor(value * n + 0.5)))
    return min(int(value), n)


def top_k_slots(scores: Tensor, k: int) -> Tensor:
    """Slots of the ``k`` highest scores; ties go to the lower slot (stable and deterministic)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k]


def apportion(k: int, sizes: list[int]) -> list[int]:
    """Split a budget of ``k`` tokens over groups of ``sizes`` in proportion to their sizes (largest
    remainder; ties to the earlier group), so the shares sum to ``k`` and none exceeds its group."""
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} tokens")
    if total == 0:
        return [0] * len(sizes)
    exact = [k * s / total for s in sizes]
    shares = [min(int(e), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    left = k - sum(shares)
    while left > 0:
        for i in order:
            if left and shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
    return shares


def top_k_per_group(scores: Tensor, k: int, groups: Tensor) -> Tensor:
    """Slots of the top scores within each group, the budget ``k`` split by :func:`apportion`."""
    ids = torch.unique(groups)
    members = [torch.nonzero(groups == g).flatten() for g in ids]
    picked = [m[top_k_slots(scores[m], share)] for m, share in zip(members, apportion(k, [len(m) for m in members]))]
    return torch.cat(picked) if picked else scores.new_empty(0, dtype=torch.long)


class Reducer:
    """Base class of every reducer. Subclasses are frozen dataclasses registered with
    :func:`lmmsqueeze.register_reducer`, which sets the class-level metadata below."""

    name: ClassVar[str]
    family: ClassVar[str]
    placements: ClassVar[tuple[str, ...]]
    needs: ClassVar[frozenset[str]]
    keeps_grid: ClassVar[bool]
    cite: ClassVar[str] = ""
    #: set by reducers that read the token grid (the validator refuses them after a grid breaker)
    requires_grid: ClassVar[bool] = False

    def output_count(self, n: int, grids: Grids) -> int:
        """Tokens out for ``n`` tokens in (per image at vision/projector placement, per sample at llm)."""
        raise NotImplementedError

    def output_grids(self, grids: Grids) -> Grids:
        """The grid of the output, or None when this reducer breaks the order."""
        return grids if self.keeps_grid else None

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        """Map a state to the reduced state. Must return ``output_count(state.n, state.grids)`` tokens."""
        raise NotImplementedError

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        """Multiply-accumulates of the matrix products this reducer performs on ``n`` tokens of width
        ``dim`` (e.g. a similarity matrix: ``n * n * dim``). The cost model adds it to the plan and a
        test checks it against ``torch.utils.flop_counter``; elementwise work is not counted.

        ``dim`` is the width of the rows the products read: the signal :meth:`metric_signal` names,
        or the tokens' hidden states at the stage's placement."""
        return 0

    def metric_signal(self) -> str | None:
        """The signal whose rows :meth:`cost_macs` multiplies (e.g. ``"vision_keys"``), or None when
        the products read the tokens' hidden states."""
        return None

    def substages(self) -> list["Reducer"] | None:
        """For a method that acts at several places (e.g. PyramidDrop at layers 8, 16, 24): the reducers
        to run in order, each with its own placement. None for a single-placement reducer."""
        return None

    @property
    def placement_layer(self) -> int | None:
        """The decoder layer this stage runs at, when its parameters name one."""
        return getattr(self, "layer", None)


@dataclass(frozen=True)
class ScoredPruner(Reducer):
    """A pruner that only scores tokens: the kept set is the top-``keep`` scores, in original order.

    A subclass whose method selects within each crop (``per_crop = True``) takes its top scores in
    every crop of an image (LLaVA-NeXT's base crop and sub-crop grid), the budget split across crops
    by their token counts; with one crop nothing changes.
    """

    per_crop: ClassVar[bool] = False
    keep: int | float = 0.5

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        """``[N]`` importance of every current token; higher is kept first."""
        raise NotImplementedError

    def output_count(self, n: int, grids: Grids) -> int:
        return resolve_keep(self.keep, n)

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k = self.output_count(state.n, state.grids)
        if k >= state.n:
            return state
        if self.per_crop:
            return state.select(top_k_per_group(self.score(state, signals), k, state.crop_ids))
        return state.select(top_k_slots(self.score(state, signals), k))


def check_layer(layer: int | None, minimum: int = 0, why: str = "") -> None:
    if layer is None:
        return
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"layer={layer!r} must be an integer >= {minimum}{reason}")


__all__ = [
    "FAMILIES",
    "LLM_SIGNALS",
    "PLACEMENTS",
    "VISION_SIGNALS",
    "SIGNALS",
    "Grid",
    "Grids",
    "Reducer",
    "ScoredPruner",
    "Signals",
    "TokenState",
    "check_keep",
    "check_layer",
    "apportion",
    "resolve_keep",
    "top_k_per_group",
    "top_k_slots",
]
