"""The one object every stage reads and returns: :class:`TokenState`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Grid = tuple[int, int]
Grids = tuple[Grid, ...] | None


@dataclass(frozen=True)
class TokenState:
    """The visual tokens of one sample (or one image) at one point of a pipeline.

    The order of the tokens is the order they take in the sequence: a stage that reorders (ToMe's
    ``[unmerged, merged]``, SparseVLM's recycled tokens after the kept ones) changes where they sit.

    Attributes:
        hidden: ``[N, D]`` hidden states of the current tokens.
        index: ``[N]`` original index (``0..n_original-1``) of each token; for a merged token, the
            index of its representative; ``-1`` for a token that stands for no single original one
            (VisionZip's [CLS] feature, PruMerge+'s summary of the pruned tokens).
        sizes: ``[N]`` how many original tokens each current token stands for (1 for untouched tokens).
        crop_ids: ``[N]`` crop (or image) each token belongs to.
        grids: ``(h, w)`` of every crop in crop-id order while the tokens are a full row-major grid
            per crop; ``None`` once a stage broke that order.
        assign: ``[n_original]`` the current slot of every original token, ``-1`` if it was dropped.
            Merged tokens share a slot, so ``assign`` gives the merge groups.
        source: ``[N]`` the slot of the previous state each token comes from (its representative;
            ``-1`` for a token made from no single one), or None when the tokens are the previous ones.
    """

    hidden: Tensor
    index: Tensor
    sizes: Tensor
    crop_ids: Tensor
    grids: Grids
    assign: Tensor
    source: Tensor | None = None

    @classmethod
    def initial(cls, hidden: Tensor, grids: Grids = None, crop_ids: Tensor | None = None) -> TokenState:
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
    def concat(
        cls, states: list[TokenState], crops: list[int], device: torch.device | None = None
    ) -> TokenState:
        """The states of several images as one (a sample's): original indices, slots and crop ids are
        offset by the images before; ``crops[i]`` is the number of crop ids of image ``i``. The grid
        survives only when every image still has one."""
        if not states:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return cls(torch.empty(0, 0, device=device), empty, torch.empty(0, device=device), empty, None,
                       empty)
        index, assign, crop_ids, index_off, slot_off, crop_off = [], [], [], 0, 0, 0
        for s, c in zip(states, crops, strict=True):
            index.append(torch.where(s.index >= 0, s.index + index_off, s.index))
            assign.append(torch.where(s.assign >= 0, s.assign + slot_off, s.assign))
            crop_ids.append(s.crop_ids + crop_off)
            index_off, slot_off, crop_off = index_off + s.n_original, slot_off + s.n, crop_off + c
        grids = None if any(s.grids is None for s in states) else tuple(g for s in states for g in s.grids)
        return cls(torch.cat([s.hidden for s in states]), torch.cat(index),
                   torch.cat([s.sizes for s in states]), torch.cat(crop_ids), grids, torch.cat(assign))

    @property
    def n(self) -> int:
        """Number of current tokens."""
        return int(self.hidden.shape[0])

    @property
    def n_original(self) -> int:
        return int(self.assign.shape[0])

    def sources(self) -> Tensor:
        """``[N]`` :attr:`source`, with the identity filled in when it is None."""
        return torch.arange(self.n, device=self.index.device) if self.source is None else self.source

    def crop_slices(self) -> list[slice]:
        """Slices of the current tokens that belong to each crop, valid while ``grids`` is set."""
        if self.grids is None:
            raise ValueError("the token order is no longer a grid (an earlier stage broke it)")
        out, start = [], 0
        for h, w in self.grids:
            out.append(slice(start, start + h * w))
            start += h * w
        return out

    def select(self, keep: Tensor) -> TokenState:
        """Keep the tokens at slots ``keep`` (any order; the result keeps the current order).

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
            source=keep,
        )

    def regroup(
        self, target: Tensor, hidden: Tensor, representative: Tensor, grids: Grids = None
    ) -> TokenState:
        """Merge, drop or reorder tokens: current slot ``i`` goes to new slot ``target[i]`` (``-1`` drops
        it).

        Args:
            target: ``[N]`` new slot of every current token, or -1.
            hidden: ``[M, D]`` hidden states of the new tokens, in their new order.
            representative: ``[M]`` the current slot whose original index a new token takes (its
                position); it must itself be mapped to that new token. ``-1`` makes a token that stands
                for no single original one (index -1; its crop is the first crop mapped to it, else 0).
            grids: the grid of the new tokens, if they form one.
        """
        target = target.to(torch.long)
        m = hidden.shape[0]
        device = target.device
        if representative.shape[0] != m:
            raise ValueError(f"{m} new tokens but {representative.shape[0]} representatives")
        real = representative >= 0
        if not torch.equal(target[representative[real]], torch.arange(m, device=device)[real]):
            raise ValueError("every representative must be mapped to the token it represents")
        alive = target >= 0
        sizes = torch.zeros(m, dtype=self.sizes.dtype, device=self.sizes.device)
        sizes.index_add_(0, target[alive], self.sizes[alive])
        index = torch.full((m,), -1, dtype=torch.long, device=device)
        index[real] = self.index[representative[real]]
        crop_ids = torch.zeros(m, dtype=torch.long, device=device)
        crop_ids[real] = self.crop_ids[representative[real]]
        made = ~real
        if bool(made.any()):  # tokens made from no single one: the first crop mapped to them, at least size 1
            none = torch.iinfo(torch.long).max
            first = torch.full((m,), none, dtype=torch.long, device=device)
            first.scatter_reduce_(0, target[alive], self.crop_ids[alive], reduce="amin")
            crop_ids[made] = torch.where(first[made] < none, first[made], 0)
            sizes[made] = sizes[made].clamp_min(1)
        return TokenState(
            hidden=hidden,
            index=index,
            sizes=sizes,
            crop_ids=crop_ids,
            grids=grids,
            assign=_remap(self.assign, target),
            source=representative,
        )

    def with_hidden(self, hidden: Tensor) -> TokenState:
        """The same tokens with other hidden states (e.g. read at another layer)."""
        if hidden.shape[0] != self.n:
            raise ValueError(f"expected {self.n} hidden states, got {hidden.shape[0]}")
        return TokenState(hidden, self.index, self.sizes, self.crop_ids, self.grids, self.assign, self.source)


def _remap(assign: Tensor, new_slot: Tensor) -> Tensor:
    out = torch.full_like(assign, -1)
    alive = assign >= 0
    out[alive] = new_slot[assign[alive]]
    return out
