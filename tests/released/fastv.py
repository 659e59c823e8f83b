"""FastV, transcribed from its released code (plain torch)."""

from __future__ import annotations

import torch
from torch import Tensor


def fastv_keep_indexs(last_layer_attention: Tensor, image_start: int, image_length: int,
                      fastv_r: float) -> Tensor:
    """The sequence columns FastV keeps from layer K on.

    Released code: pkunlp-icler/FastV, ``src/FastV/llava-hf/transformers/src/transformers/models/llama/
    modeling_llama.py``, ``LlamaModel.forward`` (its ``use_cache`` branch at ``layer_idx == FASTV_k``):
    the attention map of layer K-1 averaged over heads, its last row, the image span of it, the top
    ``round(length * (1 - R))`` image columns, every other column kept; sorted. Survivors keep their
    positions: ``position_ids = keep_indexs``.

    Args:
        last_layer_attention: ``[1, H, L, L]`` layer K-1's attention probabilities.
    """
    seq_length = last_layer_attention.shape[-1]
    average = torch.mean(last_layer_attention, dim=1)[0]
    last_token = average[-1]
    image_part = last_token[image_start:image_start + image_length]
    top = image_part.topk(round(image_length * (1 - fastv_r))).indices + image_start
    keep = torch.cat((torch.arange(image_start), top, torch.arange(image_start + image_length, seq_length)))
    return keep.sort().values
