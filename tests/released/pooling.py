"""LLaVA-NeXT's spatial pooling of image features, transcribed from its released code (plain torch).

Released code: LLaVA-VL/LLaVA-NeXT, ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.get_2dPool``
(called on the output of ``encode_images``, i.e. on the projected features). The features of each frame,
``[frames, h * w, C]``, are laid out as a ``[frames, C, h, w]`` grid and, by ``mm_spatial_pool_mode``:

* ``average``: ``avg_pool2d(x, stride)``, kernel = stride, no padding, floor mode: a ragged last row or
  column that does not fill a window is dropped (27 x 27 -> 13 x 13);
* ``max``: ``max_pool2d(x, stride)``, with the same floor windows;
* ``bilinear``: ``interpolate(x, size=(ceil(h / stride), ceil(w / stride)), mode="bilinear")``
  (``align_corners`` left at its default, False: half-pixel centres, no antialiasing; 27 x 27 -> 14 x 14).

The result is flattened back row-major to ``[frames, M, C]``. The released function reads the side from
``num_patches_per_side`` (a square grid); here the caller passes ``(h, w)``.

The released code has no notion of which patches a pooled token came from. :func:`pool_groups` states
the grouping the comparison uses: for the window modes the patches of a token's window (patches outside
every floor window belong to no token); for bilinear, output ``(i, j)`` takes the patches with
``floor(r * oh / h) == i`` and ``floor(c * ow / w) == j``. A token's representative is the first patch of
its group in row-major order (a window's top-left patch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("average", "max", "bilinear")


def get_2dpool(features: Tensor, grid: tuple[int, int], mode: str, stride: int = 2) -> Tensor:
    """Pool ``features`` (``[N, C]`` or ``[frames, N, C]``, row-major over ``grid``) as the released code.

    Returns ``[M, C]`` (or ``[frames, M, C]``), the pooled grid flattened row-major.
    """
    single = features.dim() == 2
    frames = features[None] if single else features
    count, _, channels = frames.shape
    h, w = grid
    maps = frames.reshape(count, h, w, channels).permute(0, 3, 1, 2).contiguous()
    if mode == "average":
        maps = F.avg_pool2d(maps, stride)
    elif mode == "max":
        maps = F.max_pool2d(maps, stride)
    elif mode == "bilinear":
        maps = F.interpolate(maps, size=[math.ceil(h / stride), math.ceil(w / stride)], mode="bilinear")
    else:
        raise ValueError(f"unexpected mode {mode!r}; one of {MODES}")
    pooled = maps.permute(0, 2, 3, 1).reshape(count, -1, channels)
    return pooled[0] if single else pooled


def output_grid(grid: tuple[int, int], mode: str, stride: int = 2) -> tuple[int, int]:
    """The pooled grid: floor windows for average/max, ``ceil(side / stride)`` for bilinear."""
    h, w = grid
    if mode == "bilinear":
        return math.ceil(h / stride), math.ceil(w / stride)
    return h // stride, w // stride


def pool_groups(grid: tuple[int, int], mode: str, stride: int = 2) -> tuple[Tensor, Tensor]:
    """Which pooled token every patch belongs to, and every pooled token's representative patch.

    Returns:
        groups: ``[h * w]`` the row-major slot of the pooled token each patch went into, -1 if none.
        representative: ``[oh * ow]`` the first (top-left) patch of each pooled token's group.
    """
    h, w = grid
    oh, ow = output_grid(grid, mode, stride)
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    if mode == "bilinear":
        out_r, out_c = rows * oh // h, cols * ow // w
        inside = torch.ones(h, w, dtype=torch.bool)
    else:
        out_r, out_c = rows // stride, cols // stride
        inside = (out_r < oh) & (out_c < ow)
    groups = torch.where(inside, out_r * ow + out_c, torch.full_like(rows, -1)).flatten()
    representative = torch.stack([torch.nonzero(groups == slot)[0, 0] for slot in range(oh * ow)])
    return groups, representative
