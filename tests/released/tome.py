"""ToMe (Token Merging), transcribed from its released code (plain torch).

Released code: facebookresearch/ToMe,

- ``tome/merge.py``: ``bipartite_soft_matching`` (the matching and its ``merge`` closure),
  ``merge_wavg`` (size-weighted merge) and ``merge_source`` (which original tokens each output holds);
- ``tome/patch/timm.py``: ``ToMeAttention.forward`` hands back ``k.mean(1)``, the keys of the block
  averaged over heads, as the matching metric; ``ToMeBlock.forward`` matches with
  ``class_token = model.cls_token is not None`` and merges with ``merge_wavg``.

Quirks reproduced:

- A is every even slot, B every odd slot; ``r`` is capped at half of the unprotected tokens.
- Every A token is scored by its best cosine similarity to any B token; A tokens are ranked by that
  score with a plain (unstable) descending ``argsort``; the first ``r`` merge into their best B token,
  the others stay.
- The output is NOT in spatial order: the A tokens that stay, in that ranked order, then every B token
  in its original order (a merged A token is folded into its B token). Only with a protected class
  token are the staying A tokens put back into slot order.
- ``merge_wavg``: the tokens times their sizes and the sizes are both scatter-summed into B (the B
  token's own value included), then divided: a size-weighted mean. Sizes start at 1.
- ``merge_source``: the identity source matrix merged with ``amax``.

Not transcribed: the distillation-token variant (DeiT only) and ``unmerge``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def head_mean_keys(key_projection: Tensor, heads: int) -> Tensor:
    """``[B, N, C]`` -> ``[B, N, C / heads]``: the metric ToMe's attention returns, ``k.mean(1)`` of
    the keys split into heads (``[B, heads, N, head_dim]`` there)."""
    batch, tokens, width = key_projection.shape
    return key_projection.view(batch, tokens, heads, width // heads).mean(dim=2)


@dataclass
class Matching:
    """One bipartite soft matching: which A slots stay and which merge into which B slot."""

    r: int
    stay: Tensor  # [B, |A| - r] A slots (index into the A half) that stay, in ranked order
    moving: Tensor  # [B, r] A slots that merge, in ranked order
    target: Tensor  # [B, r] the B slot (index into the B half) each moving A token merges into
    scores: Tensor  # [B, |A|, |B|] cosine similarities A x B (for margin checks)
    best: Tensor  # [B, |A|] every A token's best similarity (the ranking score)

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """``[B, N, C]`` -> ``[B, N - r, C]``: staying A tokens (ranked order), then B with A folded in."""
        if self.r <= 0:
            return x
        evens, odds = x[:, 0::2], x[:, 1::2]
        width = x.shape[-1]
        staying = evens.gather(1, self.stay[..., None].expand(-1, -1, width))
        folded = evens.gather(1, self.moving[..., None].expand(-1, -1, width))
        odds = odds.scatter_reduce(1, self.target[..., None].expand(-1, -1, width), folded, reduce=mode)
        return torch.cat([staying, odds], dim=1)

    def output_slots(self, tokens: int) -> Tensor:
        """``[B, N - r]`` the original slot of every output row: a staying A token's own slot, and for
        the B rows the B token's slot (it absorbs the A tokens merged into it)."""
        batch = self.stay.shape[0]
        b_slots = torch.arange(1, tokens, 2, device=self.stay.device).expand(batch, -1)
        return torch.cat([2 * self.stay, b_slots], dim=1)


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False) -> Matching:
    """The matching of ``bipartite_soft_matching`` for a ``[B, N, C]`` metric, removing ``r`` tokens."""
    tokens = metric.shape[1]
    r = min(r, (tokens - int(class_token)) // 2)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    best, partner = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    stay, moving = ranked[:, max(r, 0):], ranked[:, :max(r, 0)]
    if class_token:
        stay = stay.sort(dim=1).values
    target = partner.gather(1, moving)
    return Matching(r, stay, moving, target, scores, best)


def merge_wavg(matching: Matching, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Merge ``x`` as a size-weighted mean; returns the merged tokens and their new sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    total = matching.merge(x * size, mode="sum")
    size = matching.merge(size, mode="sum")
    return total / size, size


def merge_source(matching: Matching, x: Tensor, source: Tensor | None = None) -> Tensor:
    """``[B, N_out, N_orig]``: 1 where an output token holds an original token."""
    if source is None:
        batch, tokens = x.shape[:2]
        source = torch.eye(tokens, dtype=x.dtype, device=x.device)[None].expand(batch, tokens, tokens)
    return matching.merge(source, mode="amax")
