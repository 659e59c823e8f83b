"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import unit_rows
from .base import Grids, Reducer, Signals, TokenState, check_keep, resolve_keep, top_k_per_group
from .registry import register_reducer


@register_reducer(
    "visionzip",
    family="merging",
    placements=("vision",),
    needs=("cls_attention", "vision_keys"),
    keeps_grid=False,
    cite="Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025",
)
@dataclass(frozen=True)
class VisionZipReducer(Reducer):
    """Keep the ``dominant`` tokens with the highest [CLS] attention, then merge the others into
    ``contextual`` tokens: targets evenly spaced among them, every other token assigned to its most
    key-cosine-similar target, each contextual token = its target + the mean of the tokens assigned
    to it (paper: 54 + 10 for 64 tokens, 108 + 20 for 128, 162 + 30 for 192).

    ``contextual=0`` gives the dominant part alone. Output order: dominant tokens in their original
    order, then contextual tokens in their targets' order. Differences from the released code: LLaVA
    drops the [CLS] token from the features, so all ``dominant`` tokens are patches (the paper keeps
    [CLS] as one of them), and keys are the concatenated heads of the vision feature layer rather
    than their head mean. Counts are clamped to the tokens received. With several crops (LLaVA-NeXT)
    the dominant budget is split across crops by their token counts, each crop keeping its own top
    tokens (the released code runs per crop); contextual tokens are merged over the whole image.
    """

    dominant: int | float = 54
    contextual: int | float = 10

    def __post_init__(self) -> None:
        check_keep(self.dominant, "dominant")
        if not (isinstance(self.contextual, int) and not isinstance(self.contextual, bool) and self.contextual == 0):
            check_keep(self.contextual, "contextual")

    def _counts(self, n: int) -> tuple[int, int]:
        dom = resolve_keep(self.dominant, n)
        ctx = 0 if self.contextual == 0 else resolve_keep(self.contextual, n)
        return dom, min(ctx, n - dom)

    def output_count(self, n: int, grids: Grids) -> int:
        return sum(self._counts(n))

    def metric_signal(self) -> str | None:
        return "vision_keys"

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        """``dim`` is the width of the vision keys: (others x dim) @ (dim x targets)."""
        dom, ctx = self._counts(n)
        return (n - dom - ctx) * ctx * dim if ctx else 0

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        dom, ctx = self._counts(state.n)
        device = state.hidden.device
        dominant = torch.sort(top_k_per_group(signals.require("cls_attention"), dom, state.crop_ids)).values
        rest_mask = torch.ones(state.n, dtype=torch.bool, device=device)
        rest_mask[dominant] = False
        rest = torch.nonzero(rest_mask).flatten()
        target = torch.full((state.n,), -1, dtype=torch.long, device=device)
        target[dominant] = torch.arange(dom, device=device)
        hidden = [state.hidden[dominant].float()]
        representative = [dominant]
        if ctx:
            step = rest.numel() // ctx
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
            is_target[torch.arange(ctx, device=device) * step] = True
            targets, others = rest[is_target], rest[~is_target]
            keys = unit_rows(signals.require("vision_keys"))
            nearest = (keys[others] @ keys[targets].T).argmax(dim=1) if others.numel() else others
            target[targets] = dom + torch.arange(ctx, device=device)
            target[others] = dom + nearest
            sums = torch.zeros(ctx, state.hidden.shape[1], dtype=torch.float32, device=device)
            sums.index_add_(0, nearest, state.hidden[others].float())
            counts = torch.bincount(nearest, minlength=ctx).float().clamp_min(1.0)
            hidden.append(state.hidden[targets].float() + sums / counts[:, None])
            representative.append(targets)
        return state.regroup(target, torch.cat(hidden).to(state.hidden.dtype), torch.cat(representative))
