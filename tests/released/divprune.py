"""DivPrune, transcribed from its released code (plain torch).

Released code: vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``: ``LlavaMetaForCausalLM.DivPrune``
(with ``pairwise_cosine_similarity``) and the ``LAYER_INDEX == '0'`` branch at the end of
``prepare_inputs_labels_for_multimodal``; ``run_Divprune.sh`` sets ``SUBSET_RATIO=0.098``.

What the released code does, reproduced here:

* It works on the decoder's input embeddings of the image span, i.e. the projected CLIP features
  (``new_input_embeds[0][SYS_TOKEN_LEN:SYS_TOKEN_LEN + img_feature_len]``), in the model's dtype.
* ``threshold_terms = int(round(ratio * N))`` tokens are picked (Python's round: 0.098 * 576 = 56.4 -> 56).
* Distances are ``1 - cos``, the cosine taken as the product of the row-normalised features (no epsilon).
* First pick: per column, the second smallest distance (``topk(2, largest=False)``, the smallest being
  the column's own self-distance), then the argmax over columns.
* Each later pick: the rows of the tokens already picked, the minimum over those rows per column, the
  argmax over columns. Already picked tokens are not masked out (their self-distance keeps them low).
* The picks are put back in sequence order (``keep_indexs.sort()``); ``position_ids`` is ``None`` at the
  prefill of LLaVA-1.5, so the shorter sequence is numbered consecutively by the decoder.

Quirk not reproduced literally: the released branch hard-codes ``SYS_TOKEN_LEN = 35`` as the start
of the image span (the length of the LLaVA-1.5 system prompt); here the caller passes the real start.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cosine_distance(features: Tensor) -> Tensor:
    """``[N, N]`` matrix of ``1 - cos(x_i, x_j)`` for the rows of ``features`` (``[N, C]``)."""
    unit = features / features.norm(dim=1, keepdim=True)
    return 1.0 - unit @ unit.t()


def divprune_picks(features: Tensor, ratio: float = 0.098) -> tuple[Tensor, Tensor]:
    """The released greedy max-min selection, in pick order, and the per-pick score gaps.

    Returns:
        picks: ``[round(ratio * N)]`` the chosen rows of ``features`` in the order they were picked.
        gaps: for every pick, the distance between the best and the second best score of that step
            (how far the step is from a tie).
    """
    n = features.shape[0]
    budget = round(ratio * n)  # int(round(...)) in the released code: Python rounds half to even
    dist = cosine_distance(features)
    picks = torch.empty(budget, dtype=torch.long)
    gaps = torch.empty(budget, dtype=dist.dtype)
    for step in range(budget):
        if step == 0:
            # smallest entry of a column is its own diagonal; the second smallest is its nearest neighbour
            score = dist.topk(2, dim=0, largest=False).values[1]
        else:
            score = dist[picks[:step]].min(dim=0).values
        best_two = score.topk(2).values
        picks[step] = torch.argmax(score)
        gaps[step] = best_two[0] - best_two[1]
    return picks, gaps


def divprune_sequence(embeds: Tensor, image_start: int, image_length: int,
                      ratio: float = 0.098) -> tuple[Tensor, Tensor]:
    """The sequence columns the released branch keeps, sorted, and the per-pick score gaps.

    Args:
        embeds: ``[1, L, D]`` the decoder's input embeddings (image features in place).
    """
    image = embeds[0, image_start:image_start + image_length]
    picks, gaps = divprune_picks(image, ratio)
    length = embeds.shape[1]
    keep = torch.cat((torch.arange(image_start), picks + image_start,
                      torch.arange(image_start + image_length, length)))
    return keep.sort().values, gaps
