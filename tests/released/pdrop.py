"""PyramidDrop, transcribed from its released code (plain torch).

Released code: Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``:
``LlamaModel.pdrop_forward`` (the decoder loop) and ``LlamaModel.pdrop_rank_drop`` (its inference
branch, ``self.training`` False, right padding, batch of one). Defaults from the evaluation scripts
(``scripts/v1_5/pdrop_eval/*.sh``): ``--layer_list '[8,16,24]' --image_token_ratio_list
'[0.5,0.25,0.125]'`` (lambda = 0.5); the loaders insert 1.0 in front of the ratio list.

What the released loop does, and what is reproduced here:

* after decoder layer ``layer_idx`` runs, ``rank_layer = layer_idx + 1``; when it is in the layer list,
  the hidden states about to enter ``rank_layer`` are ranked with that layer's OWN ``input_layernorm``,
  ``q_proj``, ``k_proj`` and RoPE at the current position ids (the layer itself then runs on the
  reduced sequence);
* the single query is the last instruction token: column ``prompt_len + image_tokens - 1`` where
  ``prompt_len`` is the text length (the prompt without its one ``<image>`` placeholder) and
  ``image_tokens = int(N0 * ratio[stage])`` is how many image tokens the sequence holds now;
* scores: ``q k^T / sqrt(head_dim)`` plus the causal mask (a no-op for the last row), a softmax taken
  in float32 and cast back to the model dtype (a quirk kept: it rounds the scores to float32), the
  mean over heads, the columns of the current image span;
* ``keep = int(N0 * ratio[stage + 1])`` (576 -> 288 -> 144 -> 72), ``topk`` then sorted, so survivors
  stay in sequence order; the text on both sides is kept;
* position ids are renumbered ``0..L'-1`` after every drop (``position_ids[i, :cur_len] = arange``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: ``--layer_list``: a drop happens at the input of these decoder layers
LAYER_LIST = (8, 16, 24)
#: ``--image_token_ratio_list`` with the 1.0 the loaders prepend (lambda = 0.5)
RATIO_LIST = (1.0, 0.5, 0.25, 0.125)


def stage_counts(stage: int, n0: int = 576, ratios: tuple[float, ...] = RATIO_LIST) -> tuple[int, int]:
    """(image tokens in the sequence before stage ``stage``, image tokens it keeps), as the released
    code computes them from the ORIGINAL count ``n0`` (``int`` truncation)."""
    return int(n0 * ratios[stage]), int(n0 * ratios[stage + 1])


def _half_turn(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class PDropStep:
    """One rank & drop: the reduced hidden states, their renumbered positions, which of the current
    image tokens survive (0-based within the current image span, ascending) and the score gap at the
    cut (k-th minus (k+1)-th largest score)."""

    hidden: Tensor  # [1, L', D]
    position_ids: Tensor  # [1, L']
    kept: Tensor  # [keep]
    margin: float


def pdrop_rank_drop(layer: nn.Module, rotary: nn.Module, hidden: Tensor, position_ids: Tensor,
                    image_start: int, prompt_len: int, image_tokens: int, keep_length: int) -> PDropStep:
    """``pdrop_rank_drop`` for one sample at inference.

    Args:
        layer: the decoder layer ``rank_layer`` (its ``input_layernorm`` and ``self_attn.q_proj/k_proj``).
        rotary: the decoder's rotary embedding (``rotary(x, position_ids) -> (cos, sin)``).
        hidden: ``[1, L, D]`` the hidden states entering ``rank_layer`` (output of ``rank_layer - 1``).
        position_ids: ``[1, L]`` the current positions.
        image_start: column of the first image token.
        prompt_len: text tokens in the prompt (everything but the image).
        image_tokens: image tokens the sequence holds now (``int(N0 * ratio[stage])``).
        keep_length: image tokens to keep (``int(N0 * ratio[stage + 1])``).
    """
    attn = layer.self_attn
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden.clone())
    length = normed.shape[1]
    queries = attn.q_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)  # [1, H, L, d]
    keys = attn.k_proj(normed).view(1, length, -1, head_dim).transpose(1, 2)  # [1, H_kv, L, d]
    cos, sin = rotary(normed, position_ids)
    cos, sin = cos[:, None], sin[:, None]
    queries = queries * cos + _half_turn(queries) * sin
    keys = keys * cos + _half_turn(keys) * sin
    groups = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)

    query_column = prompt_len + image_tokens - 1
    mask_row = torch.full((length,), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
    mask_row[:query_column + 1] = 0.0  # the causal mask's row for that query
    logits = queries[0, :, query_column:query_column + 1] @ keys[0].transpose(1, 2) / math.sqrt(head_dim)
    probs = torch.softmax(logits + mask_row, dim=-1, dtype=torch.float32).to(queries.dtype)  # [H, 1, L]
    per_query = probs.mean(dim=0)[:, image_start:image_start + image_tokens]  # [1, image_tokens]
    scores = per_query.mean(dim=0)  # [image_tokens]

    top = scores.topk(keep_length).indices
    kept = top.sort().values
    ranked = scores.sort(descending=True).values
    margin = float(ranked[keep_length - 1] - ranked[keep_length]) if keep_length < image_tokens else math.inf

    columns = torch.cat((torch.arange(image_start, device=hidden.device), kept + image_start,
                         torch.arange(image_start + image_tokens, length, device=hidden.device)))
    reduced = hidden[:, columns]
    positions = torch.arange(reduced.shape[1], device=hidden.device)[None]
    return PDropStep(reduced, positions, kept, margin)
