"""PruMerge+, transcribed from its released code (plain torch, and numpy where it uses numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PruMergeOut:
    """What the released tower returns, and what it decided on the way (indices over the N patches)."""

    features: Tensor  # [1, len(idx) + 1, C]: kept tokens (enriched) in ``idx`` order, then the extra token
    idx: Tensor  # kept patch indices in output order: outliers by score, then the spatial samples
    outliers: int  # how many of ``idx`` are [CLS]-attention outliers
    cls_attn: Tensor  # [N] the [CLS] row of the single-head attention, patch columns
    upper_bound: float  # the outlier bound Q3 + 1.5 IQR (computed in float32)
    neighbour_sims: Tensor  # [len(idx), 33] each kept token's 33 highest cosine similarities, descending


def iqr_outlier_ratio(cls_attn: Tensor) -> tuple[float, float]:
    """(ratio, bound): the share of scores above Q3 + 1.5 IQR, as ``outlier_dectection`` computes it:
    in float32 numpy with ``np.percentile``'s default (linear) interpolation."""
    values = cls_attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    bound = q3 + 1.5 * (q3 - q1)
    return len(np.where(values > bound)[0]) / len(values), float(bound)


def not_chosen(idx: Tensor, total: int) -> Tensor:
    """The indices 0..total-1 missing from ``idx``, ascending (what ``complement_idx`` returns)."""
    keep = torch.ones(total, dtype=torch.bool)
    keep[idx] = False
    return torch.nonzero(keep).flatten()


def prumerge_plus_features(hidden: Tensor, q: Tensor, k: Tensor, neighbours: int = 32) -> PruMergeOut:
    """The reduced CLIP features PruMerge+ hands to the projector, for one image.

    Released code: 42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``,
    ``CLIPVisionTower.token_prune_merge_advanced_plus`` as ``forward`` calls it (``if_adaptive=True``,
    ``reduction_ratio=1/8``, which the adaptive branch overwrites), with ``outlier_dectection`` and
    ``complement_idx``.

    Args:
        hidden: ``[1, 1 + N, C]`` ``hidden_states[-2]``; the image features are its patches ``[:, 1:]``.
        q, k: ``[1, 1 + N, C]`` the q_proj / k_proj outputs of encoder layer 23 (forward hooks).

    Quirks reproduced: one full-width attention head, ``softmax(q k^T * C**-0.5)`` with C the feature
    width, rather than the layer's own multi-head attention; the ratio is the IQR outlier share computed
    in float32 numpy, and the kept count ``int(N * ratio)`` / the sampling step
    ``int(int(1 / ratio) / 3)`` are evaluated in Python floats as written; the spatial samples come from
    ``arange(0, 575, step)`` (575, not N: the last patch is never sampled) minus those already kept, and
    are appended after the outliers (which are in score order), not merged into a sorted list; a kept
    token's 32 neighbours are searched among the other kept tokens and all the others, using their
    original (not yet enriched) features, by cosine similarity of the raw layer-23 keys; the neighbour
    sum is weighted by the raw [CLS] attention (not normalised) and added to the token; one extra token,
    the [CLS]-attention-weighted sum of every token not kept, is appended last.
    """
    features = hidden[:, 1:]
    _, count, width = features.shape

    attn = torch.softmax((q @ k.transpose(-2, -1)) * width ** -0.5, dim=-1)
    cls_attn = attn[0, 0, 1:]

    ratio, bound = iqr_outlier_ratio(cls_attn)
    idx = torch.topk(cls_attn, int(count * ratio)).indices
    outliers = idx.numel()
    sample_step = int(int(1 / ratio) / 3)
    already = set(idx.tolist())
    samples = [int(s) for s in torch.arange(0, 575, sample_step) if int(s) not in already]
    idx = torch.cat([idx, torch.tensor(samples, dtype=idx.dtype)])

    keys = k[0, 1:]
    others = not_chosen(idx, count)
    kept_x, other_x = features[0, idx], features[0, others]
    kept_w, other_w = cls_attn[idx], cls_attn[others]
    kept_keys, other_keys = F.normalize(keys[idx], dim=-1), F.normalize(keys[others], dim=-1)

    enriched = torch.empty_like(kept_x)
    top_sims = []
    for i in range(idx.numel()):
        pool = torch.ones(idx.numel(), dtype=torch.bool)
        pool[i] = False  # every kept token but i, in idx order, then the tokens not kept
        pool_x = torch.cat([kept_x[pool], other_x])
        pool_w = torch.cat([kept_w[pool], other_w])
        pool_keys = torch.cat([kept_keys[pool], other_keys])
        sims = pool_keys @ kept_keys[i]
        nearest = torch.topk(sims, neighbours).indices
        enriched[i] = kept_x[i] + (pool_x[nearest] * pool_w[nearest, None]).sum(dim=0)
        top_sims.append(torch.topk(sims, neighbours + 1).values)

    extra = (other_x * other_w[:, None]).sum(dim=0, keepdim=True)
    out = torch.cat([enriched, extra])[None]
    return PruMergeOut(out, idx, outliers, cls_attn, bound, torch.stack(top_sims))
