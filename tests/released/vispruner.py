"""VisPruner, transcribed from its released code (plain torch).

Released code: Theia-4869/VisPruner,

- ``llava/model/multimodal_encoder/clip_encoder.py``, ``CLIPVisionTower.feature_select``: the features
  are ``hidden_states[select_layer][:, 1:]`` and the attention is ``attentions[select_layer][:, :, 0, 1:]``
  (the [CLS] row of the same layer, every head), ``select_layer = -2`` for LLaVA-1.5;
- ``llava/model/llava_arch.py``, ``LlavaMetaForCausalLM.encode_images``: the selection below;
  ``prepare_inputs_labels_for_multimodal`` projects all tokens and keeps ``features[index_mask]``.

The selection of ``T = visual_token_num`` tokens:

1. ``T_imp = int(T * important_ratio)`` (truncation), ``T_div = T - T_imp``.
2. The [CLS] attention averaged over heads; all tokens ranked by it (descending ``argsort``): the first
   ``T_imp`` are the important tokens, the rest is the residual, kept IN THAT ATTENTION-RANK ORDER.
3. While ``T_div > 0``: ``r = min(8, R - T_div)`` (``R`` the residual count), stop when ``r <= 0``.
   A = residual[0::2], B = residual[1::2] (alternate entries of the CURRENT residual order, not
   spatial neighbours); every A token scored by its best cosine similarity (unit-normalised features)
   to any B token; A ranked by that score (descending ``argsort``), its first ``r`` dropped. The new
   residual is the surviving A tokens in that ranked order, then B in its previous order: the order,
   hence the next split, changes every round.
4. The important and residual tokens become a boolean mask over the patches: the kept tokens reach the
   language model in spatial order.

Deviation (the one thing not transcribed literally): the released line that gathers the surviving A
tokens builds its batch index with ``R // 2 - r`` columns while A has ``ceil(R / 2) - r`` survivors, so
it raises ``IndexError`` (shape mismatch) whenever the residual count ``R`` is odd. The paper's
LLaVA-1.5 budgets (64/128/192 tokens, ratio 0.5) always leave an even residual; lmmsqueeze's default,
58 tokens (10% of 576), leaves ``576 - 29 = 547``, odd. Here the survivors are taken as the code
evidently means: ``A[ranked[r:]]``, all ``ceil(R / 2) - r`` of them (identical whenever ``R`` is even).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class VisPrunerSelection:
    mask: Tensor  # [B, N] bool: the kept patches (spatial order when applied)
    important: Tensor  # [B, T_imp] in descending attention order
    residual: Tensor  # [B, T_div] the diverse tokens, in the loop's final order
    attention: Tensor  # [B, N] head-mean [CLS] attention (the ranking score)
    rounds: list[Tensor] = field(default_factory=list)  # every round's A scores [B, |A|] (margin checks)
    cuts: list[int] = field(default_factory=list)  # every round's r


def vispruner_select(features: Tensor, cls_attention: Tensor, visual_token_num: int,
                     important_ratio: float = 0.5, step: int = 8) -> VisPrunerSelection:
    """The tokens ``encode_images`` keeps.

    Args:
        features: ``[B, N, C]`` the vision features (``hidden_states[-2][:, 1:]``).
        cls_attention: ``[B, H, N]`` the [CLS] attention row of the feature layer, every head.
        visual_token_num: ``T``, the tokens to keep.
    """
    batch, tokens, _ = features.shape
    n_important = int(visual_token_num * important_ratio)
    n_diverse = visual_token_num - n_important

    attention = cls_attention.mean(dim=1)
    ranked = attention.argsort(dim=-1, descending=True)
    important, residual = ranked[:, :n_important], ranked[:, n_important:]

    unit = features / features.norm(dim=-1, keepdim=True)
    rows = torch.arange(batch, device=features.device)[:, None]
    rounds, cuts = [], []
    while n_diverse > 0:
        count = residual.shape[1]
        r = min(step, count - n_diverse)
        if r <= 0:
            break
        current = unit[rows.expand(-1, count), residual]
        best = (current[:, 0::2] @ current[:, 1::2].transpose(-1, -2)).max(dim=-1).values
        survivors = best.argsort(dim=-1, descending=True)[:, r:]
        a_half, b_half = residual[:, 0::2], residual[:, 1::2]
        residual = torch.cat([a_half.gather(1, survivors), b_half], dim=-1)
        rounds.append(best)
        cuts.append(r)

    selected = torch.cat([important, residual], dim=-1) if n_diverse > 0 else important
    mask = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    mask.scatter_(1, selected, True)
    return VisPrunerSelection(mask, important, residual, attention, rounds, cuts)
