"""The state every ProxyV layer of one prefill shares, made from the run when the first one starts.

As in the official code, an image's proxies take consecutive positions from that image's first
position, and a proxy sees (besides proxies) only the non-image tokens before its own image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..reducers.base import TokenState
from .layer import ProxyVState, make_proxies
from .stage import proxyv_stage

#: the key of the shared state in ``run.scratch`` (emptied at every prefill)
SCRATCH_KEY = "proxyv"


def prefill_state(run: Any, hidden: Tensor, kwargs: dict) -> Any:
    """The ProxyV state of this prefill (made at the first ProxyV layer), or None when the layer
    should run as usual (decode steps, calls without images)."""
    p = run.prefill
    if p is None or p.decoding:
        return None
    if SCRATCH_KEY not in run.scratch:
        run.scratch[SCRATCH_KEY] = begin_proxyv(run, hidden, kwargs)
    return run.scratch[SCRATCH_KEY]


def begin_proxyv(run: Any, hidden: Tensor, kwargs: dict) -> Any:
    """One batched state when every sample holds the same image tokens and grids, else one state
    per sample (ProxyV layers then run sample by sample)."""
    p = run.prefill
    layer = proxyv_stage(run.plan).layer
    batch, length, _ = hidden.shape
    pos = kwargs.get("position_ids")
    positions = (torch.arange(length, device=hidden.device)[None] if pos is None else pos).expand(batch, -1)
    padding = p.current_padding(layer)
    seg = p.segment_for(layer)
    mrope = p.mrope if seg is None or p.mrope is None else seg.ids
    first = p.samples[0]
    alike = all(s.slots.numel() == first.slots.numel() and s.meta.grids == first.meta.grids
                and torch.equal(s.image_of_crop, first.image_of_crop) for s in p.samples)
    if first.slots.numel() and alike:
        image = torch.stack([s.slots for s in p.samples])
        return _state_for(run, hidden, image, positions, padding, first, mrope)
    return [_state_for(run, hidden[b:b + 1], s.slots[None], positions[b:b + 1], padding[b:b + 1], s,
                       None if mrope is None else mrope[:, b:b + 1])
            for b, s in enumerate(p.samples)]


def _state_for(run: Any, hidden: Tensor, image: Tensor, positions: Tensor, padding: Tensor, sample: Any,
               mrope: Tensor | None = None) -> Any:
    batch, length, _ = hidden.shape
    device = hidden.device
    meta = sample.meta
    is_other = torch.ones(batch, length, dtype=torch.bool, device=device).scatter(1, image, False)
    others = torch.stack([torch.nonzero(row).flatten() for row in is_other])
    if image.shape[1] == 0:  # a sample without images: no proxies, and the layer is an ordinary one
        proxies = hidden.new_zeros(batch, 0, hidden.shape[-1])
        empty = positions.new_zeros(batch, 0)
        rope = run.family.rotary(proxies, empty if mrope is None else empty[None].expand(3, -1, -1))
        no_tokens = torch.zeros(0, dtype=torch.long, device=device)
        return ProxyVState(image, others, positions, padding, proxies, empty, rope, no_tokens, None)
    stage = proxyv_stage(run.plan).reducer
    if stage.variant == "control":  # ordinary layers: the image tokens are all it needs
        return ProxyVState(image, others, positions, padding, hidden.new_zeros(batch, 0, hidden.shape[-1]),
                           positions[:, :0], (hidden[:, :0], hidden[:, :0]), None, None)
    tokens = hidden.gather(1, image[..., None].expand(-1, -1, hidden.shape[-1]))
    proxies, assign, splat = make_proxies(stage, run.weights, tokens, meta.grids, meta.crop_ids)
    owner = sample.image_of_crop[proxy_crops(stage, meta)]  # [P] the image of every proxy
    token_image = sample.image_of_crop[meta.crop_ids]
    start = _image_starts(positions.gather(1, image), token_image, int(sample.image_of_crop.max()) + 1)
    proxy_start = start[:, owner]  # [B, P]
    proxy_positions = proxy_start + _rank_within(owner)[None]  # in the sequence's numbering (the masks')
    if mrope is None:
        rope = run.family.rotary(proxies, proxy_positions)
    else:
        image_mrope = mrope.gather(2, image[None].expand(3, -1, -1))
        rope = run.family.rotary(proxies, proxy_mrope(stage, meta, image_mrope))
    return ProxyVState(image, others, positions, padding, proxies, proxy_positions, rope, assign, splat,
                       proxy_start)


def proxy_crops(stage: Any, meta: TokenState) -> Tensor:
    """``[P]`` the crop group of every proxy, in :func:`~lmmsqueeze.proxyv.layer.make_proxies` order."""
    device = meta.crop_ids.device
    if stage.variant == "spatial":
        return torch.cat([torch.full((oh * ow,), g, device=device)
                          for g, (oh, ow) in enumerate(stage.proxy_grids(meta.grids))])
    return torch.unique(meta.crop_ids).repeat_interleave(stage.proxies)


def _image_starts(token_positions: Tensor, token_image: Tensor, images: int) -> Tensor:
    """``[B, images]`` the first position of each image (token_positions ``[B, n]``)."""
    big = torch.iinfo(token_positions.dtype).max
    out = torch.full((token_positions.shape[0], images), big, dtype=token_positions.dtype,
                     device=token_positions.device)
    return out.scatter_reduce(1, token_image[None].expand(token_positions.shape[0], -1), token_positions,
                              "amin")


def _rank_within(owner: Tensor) -> Tensor:
    """For each entry, how many entries before it share its owner (owners come in runs)."""
    index = torch.arange(owner.numel(), device=owner.device)
    first = torch.full((int(owner.max()) + 1,), owner.numel(), dtype=torch.long, device=owner.device)
    first.scatter_reduce_(0, owner, index, reduce="amin")
    return index - first[owner]


def proxy_mrope(stage: Any, meta: TokenState, image_mrope: Tensor) -> Tensor:
    """``[3, B, P]`` M-RoPE ids of the proxies, in :func:`~lmmsqueeze.proxyv.layer.make_proxies` order.

    Like the paper's proxies, which take consecutive positions from the image's start, each group's
    proxies start at its image's first id ``s``: a spatial proxy grid is laid out as Qwen2-VL lays out
    an image (``(s, s + row, s + column)``), non-spatial proxies take ``s, s + 1, ...`` on all axes.
    """
    device = image_mrope.device
    starts = image_mrope[0]  # [B, n] temporal ids: an image's start on every one of its tokens
    parts = []
    if stage.variant == "spatial":
        for g, (oh, ow) in enumerate(stage.proxy_grids(meta.grids)):
            s = starts[:, meta.crop_ids == g].min(dim=1, keepdim=True).values  # [B, 1]
            rows = torch.arange(oh, device=device).repeat_interleave(ow)
            cols = torch.arange(ow, device=device).repeat(oh)
            parts.append(torch.stack([s.expand(-1, oh * ow), s + rows, s + cols]))
    else:
        for g in torch.unique(meta.crop_ids):
            s = starts[:, meta.crop_ids == g].min(dim=1, keepdim=True).values
            parts.append((s + torch.arange(stage.proxies, device=device))[None].expand(3, -1, -1))
    return torch.cat(parts, dim=2)
