"""VisionZip, transcribed from its released code (plain torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class VisionZipOut:
    """What the released tower returns, and what it decided on the way (indices count the [CLS] as 0)."""

    features: Tensor  # [1, 1 + dominant_num + contextual_num, C]: [CLS], dominant patches, contextual tokens
    dominant: Tensor  # [1 + dominant_num] sorted sequence indices of the dominant tokens (0 = [CLS])
    targets: Tensor  # [contextual_num] sequence indices of the contextual targets, in output order
    merged: Tensor  # sequence indices of the tokens merged into a target
    slot: Tensor  # for each of ``merged``, the contextual slot (0..contextual_num-1) it joins
    cls_scores: Tensor  # [N] [CLS] attention summed over heads, per patch (the dominant ranking)
    similarity: Tensor  # [len(merged), contextual_num] cosine similarity of merged tokens to targets


def head_mean_keys(k_proj_out: Tensor, num_heads: int) -> Tensor:
    """``[1, L, C]`` k_proj output -> ``[1, L, C / H]``: the keys split into heads and averaged over
    them, as the released ``CLIPAttention_forward`` returns ``raw_key_states.mean(1)``."""
    b, length, width = k_proj_out.shape
    per_head = k_proj_out.view(b, length, num_heads, width // num_heads).transpose(1, 2)
    return per_head.mean(dim=1)


def visionzip_features(attention: Tensor, hidden: Tensor, metric: Tensor, dominant: int = 54,
                       contextual: int = 10) -> VisionZipOut:
    """The reduced CLIP features VisionZip hands to the projector, for one image.

    Released code: dvlab-research/VisionZip, ``visionzip/clip_encoder.py``,
    ``CLIPVisionTower_VisionZip.forward`` (the tensor branch), with ``visionzip/utils.py``
    (``CLIPAttention_forward``: the ``metric`` is the layer's k_proj output split into heads and averaged
    over the heads; ``CLIP_EncoderLayer_forward`` / ``apply_info``: r = [0] * 22 + [1] + [0], so the
    metric comes from encoder layer 22, the layer whose output is ``hidden_states[-2]``) and
    ``visionzip/main.py`` (``visionzip(model, dominant, contextual)`` stores ``dominant - 1``).

    Args:
        attention: ``[1, H, 1 + N, 1 + N]`` ``attentions[-2]`` (layer 22's attention probabilities).
        hidden: ``[1, 1 + N, C]`` ``hidden_states[-2]`` ([CLS] included).
        metric: ``[1, 1 + N, C / H]`` layer 22's head-averaged keys (``head_mean_keys``).
        dominant, contextual: the arguments of ``visionzip(model, dominant, contextual)``.

    Quirks reproduced: the [CLS] feature is kept as the first output token and counts against
    ``dominant`` (``dominant - 1`` patches are ranked); the dominant tokens (and the rest) stay in
    sequence order, not score order; contextual targets are every ``step = max(1, R // contextual)``-th
    remaining token from the first, cut to ``contextual``; a contextual token is its target's hidden
    state plus the plain mean of the tokens assigned to it (the target not among them); argmax ties go
    to the first target.
    """
    dominant_num = dominant - 1
    length = hidden.shape[1]

    # dominant: [CLS] plus the patches the [CLS] query attends to most, all heads summed
    cls_scores = attention[0, :, 0, 1:].sum(dim=0)
    top_patches = cls_scores.topk(dominant_num).indices + 1
    chosen = torch.zeros(length, dtype=torch.bool)
    chosen[0] = True
    chosen[top_patches] = True
    dominant_idx = torch.nonzero(chosen).flatten()  # ascending: [CLS] first
    rest_idx = torch.nonzero(~chosen).flatten()  # ascending
    dominant_tokens = hidden[0, dominant_idx]

    # contextual: evenly spaced targets among the rest; every other rest token joins its nearest target
    rest_hidden = hidden[0, rest_idx]
    rest_keys = metric[0, rest_idx]
    rest_keys = rest_keys / rest_keys.norm(dim=-1, keepdim=True)
    count = rest_idx.numel()
    step = max(1, count // contextual)
    target_pos = torch.arange(0, count, step)[:contextual]
    is_target = torch.zeros(count, dtype=torch.bool)
    is_target[target_pos] = True
    other_pos = torch.nonzero(~is_target).flatten()
    similarity = rest_keys[other_pos] @ rest_keys[target_pos].T
    slot = similarity.argmax(dim=1)
    sums = torch.zeros(target_pos.numel(), hidden.shape[2], dtype=hidden.dtype)
    sums.index_add_(0, slot, rest_hidden[other_pos])
    counts = torch.bincount(slot, minlength=target_pos.numel()).clamp(min=1).to(hidden.dtype)
    contextual_tokens = rest_hidden[target_pos] + sums / counts[:, None]

    features = torch.cat([dominant_tokens, contextual_tokens])[None]
    return VisionZipOut(features, dominant_idx, rest_idx[target_pos], rest_idx[other_pos], slot, cls_scores,
                        similarity)
