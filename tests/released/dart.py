"""DART, transcribed from its released code (plain torch and Python sets).

Released code: the original DART repository as vendored in Chenfei-Liao/VTC-Bench,
``external/DART/llava/model/language_model/modeling_llama_self.py``: ``DART.forward`` (the decoder
loop) and ``DART.get_retained_image_token``. Defaults from ``llava/eval/model_vqa_loader.py``
(and the evaluation scripts): ``--pruned_layer 2 --max_num_trunction 128 --reduction_ratio 0.778
--pivot_image_token 4 --pivot_text_token 4``; ``config.text_length`` stays None for LLaVA-1.5.

What the released code does, and what is reproduced here:

* when the loop reaches the layer whose ``layer_idx == K`` it reads the outputs of layer K-1:
  ``last_layer_state = self.norm(hidden)`` (the model's FINAL RMSNorm applied to layer K-1's output)
  and ``any_states = layer_outputs[-2]``, the key states layer K-1's attention returned (post-RoPE,
  after the cache update and ``repeat_kv``), flattened to ``[L, H * head_dim]``;
* ``TOKEN_TOPK = ceil(max_num_trunction // (pivot_image_token + pivot_text_token))`` = 128 // 8 = 16
  (the reduction ratio only matters when ``max_num_trunction`` is None);
* pivots: the 4 image tokens and the 4 tokens after the image (everything after the image span) with
  the largest L1 norm of their keys;
* ``indices_set = set(image_pivots + text_pivots)`` and the loop walks ``list(indices_set)``: the order
  in which pivots pick is CPython's set iteration order over the absolute sequence indices, which is
  reproduced by using Python sets of Python ints exactly as released;
* each pivot takes the ``TOKEN_TOPK`` not-yet-chosen, non-pivot image tokens with the LOWEST cosine
  similarity to it (``topk`` of the negated similarity), in the order of ``list(valid_indices)``;
* the text pivots are removed at the end, so 4 + 8 * 16 = 132 image tokens stay (not 128);
* ``keep_indexs`` = text before the image, the retained image tokens, text after it, sorted; survivors
  keep their ORIGINAL positions (``position_ids = keep_indexs``) and the causal mask is cut to size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: ``--pruned_layer``: the pruning happens at the input of this decoder layer
DART_K = 2
MAX_NUM_TRUNCTION = 128
REDUCTION_RATIO = 0.778
PIVOT_IMAGE_TOKEN = 4
PIVOT_TEXT_TOKEN = 4


def _gap(values: Tensor, k: int) -> float:
    """k-th largest minus (k+1)-th largest (inf when nothing is cut)."""
    if k >= values.numel():
        return math.inf
    ranked = values.sort(descending=True).values
    return float(ranked[k - 1] - ranked[k])


def dart_retained_image_tokens(last_layer_state: Tensor, key_states: Tensor, image_start: int,
                               image_length: int, max_num_trunction: int | None = MAX_NUM_TRUNCTION,
                               reduction_ratio: float = REDUCTION_RATIO,
                               pivot_image_token: int = PIVOT_IMAGE_TOKEN,
                               pivot_text_token: int = PIVOT_TEXT_TOKEN,
                               margins: list[float] | None = None) -> Tensor:
    """``get_retained_image_token``: absolute sequence indices of the image tokens kept, in the
    (unsorted) order of the released set.

    Args:
        last_layer_state: ``[1, L, D]`` the final norm applied to layer K-1's output.
        key_states: ``[1, H, L, head_dim]`` layer K-1's post-RoPE keys (after ``repeat_kv``).
        margins: when given, the score gap at every ``topk`` cut is appended (pivot L1 norms, then
            each pivot's negated cosine similarities), so a caller can rule out near-ties.
    """
    budget = max_num_trunction if max_num_trunction is not None else image_length * (1 - reduction_ratio)
    token_topk = math.ceil(budget // (pivot_image_token + pivot_text_token))

    flat_keys = key_states.permute(0, 2, 1, 3).reshape(key_states.shape[0], key_states.shape[2], -1)[0]
    image_norms = flat_keys[image_start:image_start + image_length].norm(p=1, dim=-1)
    text_norms = flat_keys[image_start + image_length:].norm(p=1, dim=-1)
    image_pivots = (image_norms.topk(pivot_image_token).indices + image_start).tolist()
    text_pivots = (text_norms.topk(pivot_text_token).indices + image_start + image_length).tolist()
    if margins is not None:
        margins += [_gap(image_norms, pivot_image_token), _gap(text_norms, pivot_text_token)]

    chosen = set(image_pivots + text_pivots)
    candidates = set(range(image_start, image_start + image_length)) - set(image_pivots)
    candidate_list = list(candidates)
    states = last_layer_state[0]
    for pivot in list(chosen):
        dissimilarity = -torch.nn.functional.cosine_similarity(states[pivot], states[candidate_list], dim=-1)
        picks = [candidate_list[j] for j in dissimilarity.topk(token_topk).indices.tolist()]
        if margins is not None:
            margins.append(_gap(dissimilarity, token_topk))
        chosen.update(picks)
        candidates.difference_update(picks)
        candidate_list = list(candidates)
    chosen.difference_update(text_pivots)
    return torch.tensor(list(chosen), device=last_layer_state.device)


def dart_keep_indexs(retained: Tensor, image_start: int, image_length: int, seq_length: int) -> Tensor:
    """``keep_indexs`` in ``DART.forward``: every text column plus the retained image tokens, sorted.
    They are also the position ids of the pruned sequence."""
    device = retained.device
    keep = torch.cat((torch.arange(image_start, device=device), retained,
                      torch.arange(image_start + image_length, seq_length, device=device)))
    return keep.sort().values
