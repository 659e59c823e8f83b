"""Position policies: the positions tokens take after a stage drops, merges or reorders them.

Every stage has ``positions=keep|renumber`` (the default is what the method's released code does):

* ``keep``: every surviving token keeps the position it had; a merged token takes its
  representative's, a token made from no single one (VisionZip's [CLS]) its image's first position.
  Text after a reduced image keeps its positions too (the sequence has gaps).
* ``renumber``: the shortened sequence is numbered by the model's own rule, as if it were the prompt.
  With 1-D RoPE (LLaVA, LLaVA-NeXT) that counts the tokens: position = first position + the number
  of tokens before. With M-RoPE (Qwen2-VL), whose image tokens take ``(s, s + row, s + column)`` from
  their image's first id ``s`` and whose text continues after an image's largest id, an image whose
  tokens still form a grid (pooling) is numbered as an image of that grid; otherwise each surviving
  image token keeps its (row, column) offset; each image starts at the next free id and the text
  after it follows its tokens' largest id.

Positions are carried as ids ``[R, B, L]``: ``R = 1`` for 1-D RoPE, ``R = 3`` for M-RoPE (temporal,
height, width). Decode steps continue each layer's numbering: a layer whose prefill was renumbered
sees every later token shifted by the positions its prefill saved (:func:`shift_rope`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def grid_offsets(grids: tuple[tuple[int, int], ...], rows: int, device: torch.device) -> tuple[Tensor, int]:
    """``[n, rows]`` each token's offset from its image's first position and the positions the image
    spans: for 1-D RoPE (``rows == 1``) its place in the run; for M-RoPE ``(0, row, column)`` in its
    grid (one grid per image), spanning ``max(h, w)`` ids."""
    if rows == 1:
        n = sum(h * w for h, w in grids)
        return torch.arange(n, device=device)[:, None], n
    (h, w), = grids
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    return torch.stack([torch.zeros_like(r), r, c], 1), max(h, w)


def renumber(ids: Tensor, real: Tensor, image_of: Tensor) -> Tensor:
    """Number a sequence by the model's own rule (see the module docstring).

    Args:
        ids: ``[R, B, L]`` the ids the columns have now (surviving tokens' ids; M-RoPE image tokens
            must still hold ``start + offset``).
        real: ``[B, L]`` True for the tokens that count (not padding, not filler columns).
        image_of: ``[B, L]`` the image each column belongs to (>= 0), -1 for text.

    Returns:
        ``[R, B, L]`` new ids; columns that do not count keep theirs.
    """
    out = ids.clone()
    r, b, _ = ids.shape
    for s in range(b):
        cols = torch.nonzero(real[s]).flatten()
        if not cols.numel():
            continue
        first = ids[:, s, cols[0]].min()
        if r == 1:
            out[0, s, cols] = first + torch.arange(cols.numel(), device=ids.device)
            continue
        owner = image_of[s, cols]
        is_image = owner >= 0
        run_start = is_image & torch.cat([torch.ones(1, dtype=torch.bool, device=ids.device),
                                          owner[1:] != owner[:-1]])
        run = torch.cumsum(run_start.long(), 0) - 1  # image run of every image column
        cur = ids[:, s, cols]  # [3, n]
        base = torch.full((int(run_start.sum()),), torch.iinfo(ids.dtype).max, dtype=ids.dtype,
                          device=ids.device)
        base.scatter_reduce_(0, run[is_image], cur[0, is_image], reduce="amin")  # each image's first id
        offsets = cur[:, is_image] - base[run[is_image]][None]
        span = torch.zeros_like(base).scatter_reduce_(0, run[is_image], offsets.amax(0), reduce="amax") + 1
        step = torch.where(is_image, 0, 1).to(ids.dtype)
        step[run_start] = span
        start = first + torch.cumsum(step, 0) - step  # the next free id at every column
        new = start[None].expand(r, -1).clone()
        image_start = start[run_start][run[is_image]]
        new[:, is_image] = image_start[None] + offsets
        out[:, s, cols] = new
    return out


def next_position(ids: Tensor, real: Tensor) -> Tensor:
    """``[B]`` the position after the largest id of the real columns (where decoding continues)."""
    masked = ids.masked_fill(~real[None], torch.iinfo(ids.dtype).min)
    return masked.amax(dim=(0, 2)) + 1


def shift_rope(
    cos: Tensor, sin: Tensor, rotary: torch.nn.Module, delta: Tensor, mrope: bool
) -> tuple[Tensor, Tensor]:
    """cos/sin of positions ``delta`` (``[B]``) lower than those of ``cos``/``sin`` (``[B, q, head_dim]``),
    by the angle-difference identities; ``rotary`` gives the angles of ``delta`` (equal on all three
    M-RoPE axes, so one angle per frequency)."""
    ids = delta[:, None].to(torch.long)
    ids = ids[None].expand(3, -1, -1) if mrope else ids
    dc, ds = rotary(cos, ids)  # [B, 1, head_dim], scaled like cos/sin
    scale = float(getattr(rotary, "attention_scaling", 1.0)) or 1.0
    return (cos * dc + sin * ds) / scale, (sin * dc - cos * ds) / scale


def rewritten_ids(
    orig: Tensor, runs: list[list[Tensor]], images: list[list], safe: Tensor, present: Tensor
) -> Tensor:
    """The position ids of a prompt whose image runs the pre-LLM stages shortened.

    Each image's reduced run starts at the image's first position, less what the images before it
    gave up, and takes its records' offsets; text keeps its positions less what the images before it
    gave up (an image gives up ``span_in - span``: nothing when its stages kept positions).

    Args:
        orig: ``[R, B, L]`` the ids of the prompt as the processor built it.
        runs: per sample, the original columns of each image's run, in reading order.
        images: per sample, the :class:`~.records.ImageRecord` of each image.
        safe, present: ``[B, L']`` the original column of every column of the shorter prompt (added
            padding: ``present`` False).

    Returns:
        ``[R, B, L']``.
    """
    new = orig.clone()
    for b, (cols, recs) in enumerate(zip(runs, images, strict=True)):
        given_up = 0
        for run, rec in zip(cols, recs, strict=True):
            start = orig[:, b, run[0]].min()
            offsets = rec.run_offsets().T.to(orig.dtype)  # [R, run_out]
            new[:, b, run[:offsets.shape[1]]] = start - given_up + offsets
            given_up += rec.span_in - rec.span
            new[:, b, int(run[-1]) + 1:] = orig[:, b, int(run[-1]) + 1:] - given_up
    return new.gather(2, safe[None].expand(new.shape[0], -1, -1)).masked_fill(~present[None], 0)
