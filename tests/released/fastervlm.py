"""FasterVLM, transcribed from its released code (plain torch).

Released code: Theia-4869/FasterVLM,

- ``llava/model/multimodal_encoder/clip_encoder.py``, ``CLIPVisionTower.feature_select``: the features
  are ``hidden_states[select_layer][:, 1:]``, the attention ``attentions[select_layer][:, :, 0, 1:]``
  (the [CLS] row of the feature layer, every head; ``select_layer = -2`` for LLaVA-1.5);
- ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.encode_images``: the [CLS] attention averaged
  over heads, ``topk(visual_token_num)``, scattered into a boolean index mask;
  ``prepare_inputs_labels_for_multimodal`` projects every token and keeps ``features[index_mask]``,
  so the kept tokens reach the language model in spatial order (the ``topk`` order is discarded).
"""

from __future__ import annotations

import torch
from torch import Tensor


def fastervlm_mask(cls_attention: Tensor, visual_token_num: int) -> tuple[Tensor, Tensor]:
    """``([B, N] bool index mask, [B, N] head-mean attention)`` for ``[B, H, N]`` [CLS] attentions."""
    attention = cls_attention.mean(dim=1)
    chosen = torch.topk(attention, k=visual_token_num, dim=1).indices
    mask = torch.zeros_like(attention, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask, attention
