"""Small helpers shared by the built-in reducers (not part of the public API)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import UNALIGNED_SIGNALS, Grids, Reducer, Signals, TokenState, wide


def unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm, in at least float32 (cosine similarity is then ``a @ b.T``)."""
    x = wide(x)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


#: rows per block of :func:`gram` (on one CPU thread 128 was fastest: 2,916 x 1,024 in 163 ms against
#: 264 ms for the whole product, 2,552 x 128 in 14.5 against 22)
GRAM_BLOCK = 128


def gram(x: Tensor) -> Tensor:
    """``x @ x.T`` with every product above the diagonal computed once: each block of ``GRAM_BLOCK`` rows
    is multiplied by its own and all later rows, and the blocks below the diagonal are copies of their
    transposes (about half the multiply-adds; the matrix is exactly symmetric). :func:`gram_macs` counts
    them. For selection only: no gradient flows through it (products written into one matrix)."""
    x = x.detach()
    n = x.shape[0]
    out = x.new_empty(n, n)
    for start in range(0, n, GRAM_BLOCK):
        end = min(start + GRAM_BLOCK, n)
        torch.mm(x[start:end], x[start:].T, out=out[start:end, start:])
        out[end:, start:end] = out[start:end, end:].T
    return out


def gram_macs(n: int, dim: int) -> int:
    """Multiply-adds of :func:`gram` on ``n`` rows of width ``dim``."""
    return sum(min(GRAM_BLOCK, n - start) * (n - start) for start in range(0, n, GRAM_BLOCK)) * dim


def bilinear_grids(hidden: Tensor, grids: Grids, out_grids: Grids) -> tuple[Tensor, Tensor]:
    """Resize each crop's token grid (``hidden``: ``[..., N, D]``, crops one after another in
    row-major order) to its output grid with bilinear interpolation (``align_corners=False``).

    Returns the resized tokens ``[..., M, D]`` (in ``hidden``'s dtype) and, for every input token,
    the output token whose cell holds it (``[N]``).
    """
    lead, d = hidden.shape[:-2], hidden.shape[-1]
    device = hidden.device
    pieces, targets, start, offset = [], [], 0, 0
    for (h, w), (oh, ow) in zip(grids, out_grids, strict=True):
        crop = wide(hidden[..., start:start + h * w, :].reshape(-1, h, w, d).permute(0, 3, 1, 2))
        resized = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=False)
        pieces.append(resized.permute(0, 2, 3, 1).reshape(*lead, oh * ow, d))
        rows = torch.arange(h, device=device).repeat_interleave(w) * oh // h
        cols = torch.arange(w, device=device).repeat(h) * ow // w
        targets.append(offset + rows * ow + cols)
        start += h * w
        offset += oh * ow
    return torch.cat(pieces, -2).to(hidden.dtype), torch.cat(targets)


def weighted_means(target: Tensor, hidden: Tensor, weights: Tensor, m: int) -> Tensor:
    """``[m, D]`` weighted mean (in at least float32) of the rows of ``hidden`` sent to each new slot by
    ``target`` (rows with ``target == -1`` are left out)."""
    alive = target >= 0
    x = wide(hidden)
    w = weights.to(x.dtype)[alive]
    num = torch.zeros(m, hidden.shape[1], dtype=x.dtype, device=hidden.device)
    num.index_add_(0, target[alive], x[alive] * w[:, None])
    den = torch.zeros(m, dtype=x.dtype, device=hidden.device).index_add_(0, target[alive], w)
    return num / den.clamp_min(1e-12)[:, None]


def realign(signals: Signals, after: TokenState) -> Signals:
    """Signals of a state restricted to the tokens of ``after``, one reduction later (each new token
    reads the signal of its representative), so a multi-part reducer can run its parts back to back."""
    slots = after.sources()
    out = Signals()
    for field in dataclasses.fields(Signals):
        value = getattr(signals, field.name)
        if value is not None and field.name not in UNALIGNED_SIGNALS:
            value = value[slots]
        elif value is not None and field.name == "text_image_attention":
            value = value[:, slots]
        setattr(out, field.name, value)
    return out


def run_parts(parts: list[Reducer], state: TokenState, signals: Signals) -> TokenState:
    """Apply single-placement reducers in order on one state (what the runtime does layer by layer,
    except that later parts see the first part's signals, not fresh ones)."""
    for part in parts:
        new = part.reduce(state, signals)
        signals = realign(signals, new)
        state = new
    return state
