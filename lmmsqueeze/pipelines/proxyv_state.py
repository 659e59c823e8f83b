"""The state every ProxyV layer of one prefill shares, made from the run when the first one starts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..proxyv.layer import ProxyVState, make_proxies
from ..reducers.base import TokenState


def begin_proxyv(run: Any, hidden: Tensor, kwargs: dict) -> Any:
    """One batched state when every sample holds the same image tokens and grids, else one state
    per sample (ProxyV layers then run sample by sample)."""
    p = run.prefill
    batch, length, _ = hidden.shape
    pos = kwargs.get("position_ids")
    positions = (torch.arange(length, device=hidden.device)[None] if pos is None else pos).expand(batch, -1)
    padding = p.current_padding(run.plan.proxyv.layer)
    seg = p.segment_for(run.plan.proxyv.layer)
    mrope = p.mrope if seg is None or p.mrope is None else seg.ids
    first = p.samples[0]
    if first.slots.numel() and all(s.slots.numel() == first.slots.numel() and s.meta.grids == first.meta.grids
                                   for s in p.samples):
        image = torch.stack([s.slots for s in p.samples])
        return _state_for(run, hidden, image, positions, padding, first.meta, mrope)
    return [_state_for(run, hidden[b:b + 1], s.slots[None], positions[b:b + 1], padding[b:b + 1], s.meta,
                                   None if mrope is None else mrope[:, b:b + 1])
            for b, s in enumerate(p.samples)]

def _state_for(run: Any, hidden: Tensor, image: Tensor, positions: Tensor, padding: Tensor,
               meta: TokenState, mrope: Tensor | None = None) -> Any:
    batch, length, _ = hidden.shape
    is_other = torch.ones(batch, length, dtype=torch.bool, device=hidden.device).scatter(1, image, False)
    others = torch.stack([torch.nonzero(row).flatten() for row in is_other])
    if image.shape[1] == 0:  # a sample without images: no proxies, and the layer is an ordinary one
        proxies = hidden.new_zeros(batch, 0, hidden.shape[-1])
        empty = positions.new_zeros(batch, 0)
        rope = run.adapter.rotary(proxies, empty if mrope is None else empty[None].expand(3, -1, -1))
        no_tokens = torch.zeros(0, dtype=torch.long, device=hidden.device)
        return ProxyVState(image, others, positions, padding, proxies, empty, rope, no_tokens, None)
    tokens = hidden.gather(1, image[..., None].expand(-1, -1, hidden.shape[-1]))
    proxies, assign, splat = make_proxies(run.plan.proxyv.reducer, run.proxyv_adapter, tokens, meta.grids,
                                          meta.crop_ids)
    start = positions.gather(1, image).min(dim=1, keepdim=True).values
    proxy_positions = start + torch.arange(proxies.shape[1], device=hidden.device)[None]
    if mrope is None:
        rope = run.adapter.rotary(proxies, proxy_positions)
    else:
        image_mrope = mrope.gather(2, image[None].expand(3, -1, -1))
        rope = run.adapter.rotary(proxies, proxy_mrope(run.plan.proxyv.reducer, meta, image_mrope))
    return ProxyVState(image, others, positions, padding, proxies, proxy_positions, rope, assign, splat)


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
