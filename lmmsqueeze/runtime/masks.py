"""Attention masks of the shortened prefill: the kept columns of the model's mask, filler columns
masked out."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ModelError


def slice_square_mask(mask: Any, keep: Tensor) -> Any:
    """Restrict a prefill mask to the kept columns (queries and keys)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ModelError(f"attention masks of type {type(mask).__name__} are not supported; use sdpa, eager "
                         "or flash_attention_2")
    if mask.dim() == 2:
        return mask.gather(1, keep)
    h = mask.shape[1]
    n = keep.shape[1]
    rows = mask.expand(keep.shape[0], -1, -1, -1).gather(
        2, keep[:, None, :, None].expand(-1, h, -1, mask.shape[3]))
    return rows.gather(3, keep[:, None, None, :].expand(-1, h, n, -1))


def mask_filler(mask: Any, alive: Tensor | None, square: bool, queries: int = 0, flat: bool = False) -> Any:
    """Mask out filler key columns (``alive`` False); build the causal mask when there was none:
    4-D for sdpa/eager, a 2-D padding mask for flash-attn (``flat``), which unpads the fillers."""
    if alive is None:
        return mask
    b, n = alive.shape
    if mask is None and flat:
        return alive.long()
    if mask is None:
        q = n if square else queries
        rows = torch.arange(q, device=alive.device)[:, None] + (n - q)  # key index of each query
        keys = torch.arange(n, device=alive.device)[None, :]
        return ((keys <= rows)[None, None] & alive[:, None, None, :]) | (keys == rows)[None, None]
    if mask.dim() == 2:
        return mask & alive.to(mask.dtype) if mask.dtype == torch.bool else mask * alive.to(mask.dtype)
    cols = alive[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & cols
    return mask.masked_fill(~cols, torch.finfo(mask.dtype).min)


def slice_key_columns(mask: Any, keep: Tensor, prefill_length: int) -> Any:
    """Restrict a decode-step mask's key columns to the kept prefill columns plus all later ones."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ModelError(f"attention masks of type {type(mask).__name__} are not supported; use sdpa, eager "
                         "or flash_attention_2")
    total = mask.shape[-1]
    tail = torch.arange(prefill_length, total, device=keep.device).expand(keep.shape[0], -1)
    cols = torch.cat([keep, tail], dim=1)
    if mask.dim() == 2:
        return mask.gather(1, cols)
    b, h, q = mask.shape[:3]
    return mask.expand(keep.shape[0], -1, -1, -1).gather(3, cols[:, None, None, :].expand(-1, h, q, -1))
