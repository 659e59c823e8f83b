"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._common import unit_rows
from .base import (
    Grids,
    Reducer,
    Signals,
    TokenState,
    check_count,
    check_keep,
    resolve_keep,
    top_k_per_group,
    wide,
)
from .registry import register_reducer
from .search import searchable


@register_reducer(
    "visionzip",
    family="merging",
    placements=("vision",),
    needs=("cls_attention", "vision_keys"),
    optional=("cls_hidden",),
    keeps_grid=False,
    cite="Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025",
    code="dvlab-research/VisionZip, visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward "
    "(utils.py::CLIPAttention_forward for the keys, main.py::visionzip for dominant - 1)",
    fidelity="exact on one-crop images; approx on LLaVA-NeXT (the released code runs the whole budget and a "
    "[CLS] per crop; here the dominant budget is shared across crops and no [CLS] is kept) and on Qwen2-VL "
    "(no [CLS] token: cls_attention is a stand-in and every dominant token is a patch)",
)
@dataclass(frozen=True)
class VisionZipReducer(Reducer):
    """``dominant`` tokens: the vision tower's [CLS] feature and the ``dominant - 1`` patches its [CLS]
    attends to most (in their original order), then ``contextual`` tokens merged from the rest: targets
    every ``max(1, rest // contextual)``-th of them, every other token assigned to its most
    key-cosine-similar target (keys averaged over heads), each contextual token = its target + the mean
    of the tokens assigned to it. Paper: 54 + 10 for 64 tokens, 108 + 20 for 128, 162 + 30 for 192.

    Output order: [CLS], the dominant patches, the contextual tokens in their targets' order. The [CLS]
    token stands for no patch (index -1); ``cls=false`` (a departure) keeps ``dominant`` patches instead,
    as happens on towers without [CLS] and on several crops (LLaVA-NeXT, whose dominant budget is split
    across crops by their token counts). ``contextual=0`` gives the dominant part alone.
    """

    dominant: int | float = searchable(54, low=0.02, high=0.5, log=True)
    contextual: int | float = searchable(10, low=0.007, high=0.2, log=True)
    cls: bool = True

    def __post_init__(self) -> None:
        check_keep(self.dominant, "dominant")
        if not (isinstance(self.contextual, int) and not isinstance(self.contextual, bool)
                and self.contextual == 0):
            check_keep(self.contextual, "contextual")

    def check_input(self, n: int, grids: Grids) -> None:
        check_count(self.dominant, n, "dominant")
        check_count(self.contextual, n, "contextual")
        dom = resolve_keep(self.dominant, n)
        ctx = 0 if self.contextual == 0 else resolve_keep(self.contextual, n)
        if dom + ctx > n:
            raise ValueError(f"dominant={self.dominant} + contextual={self.contextual} make {dom + ctx} "
                             f"tokens, more than the {n} image tokens this stage receives; give dominant + "
                             f"contextual <= {n} (the paper's ratio: dominant={max(1, n * 54 // 64)}, "
                             f"contextual={n * 10 // 64})")

    def bind(self, available: frozenset[str]) -> VisionZipReducer:
        return self if "cls_hidden" in available else dataclasses.replace(self, cls=False)

    def _uses_cls(self, grids: Grids) -> bool:
        """The [CLS] feature is a dominant token on one-crop images (several crops: LLaVA-NeXT)."""
        return self.cls and (grids is None or len(grids) == 1)

    def _counts(self, n: int, grids: Grids) -> tuple[int, int]:
        """(dominant, contextual) tokens out of ``n``: never more than ``n`` in all (a budget of all the
        tokens keeps them as they are)."""
        dom = resolve_keep(self.dominant, n)
        ctx = 0 if self.contextual == 0 else resolve_keep(self.contextual, n)
        return dom, min(ctx, n - dom)

    def output_count(self, n: int, grids: Grids) -> int:
        return sum(self._counts(n, grids))

    def metric_signal(self) -> str | None:
        return "vision_keys"

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        """``dim`` is the width of the head-mean vision keys: (others x dim) @ (dim x targets)."""
        dom, ctx = self._counts(n, grids)
        rest = n - dom + (1 if self._uses_cls(grids) else 0)  # with [CLS] one more patch is left for merging
        return (rest - ctx) * ctx * dim if ctx and dom < n else 0

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        dom, ctx = self._counts(state.n, state.grids)
        if dom >= state.n:  # the budget holds every token: kept as they are (no longer a grid, as planned)
            return dataclasses.replace(state, grids=None)
        device = state.hidden.device
        cls = signals.cls_hidden if self._uses_cls(state.grids) else None
        if cls is not None and (cls.shape[0] != 1 or bool((state.crop_ids != 0).any())):
            cls = None  # the image's tokens come from several crops
        patches = dom - (1 if cls is not None else 0)
        dominant = torch.sort(
            top_k_per_group(signals.require("cls_attention"), patches, state.crop_ids)
        ).values
        rest_mask = torch.ones(state.n, dtype=torch.bool, device=device)
        rest_mask[dominant] = False
        rest = torch.nonzero(rest_mask).flatten()
        ctx = min(ctx, rest.numel())
        first = 1 if cls is not None else 0
        target = torch.full((state.n,), -1, dtype=torch.long, device=device)
        target[dominant] = first + torch.arange(patches, device=device)
        hidden = [state.hidden[dominant]]
        representative = [dominant]
        if cls is not None:
            hidden.insert(0, cls.to(state.hidden.dtype))
            representative.insert(0, torch.full((1,), -1, dtype=torch.long, device=device))
        if ctx:
            step = max(1, rest.numel() // ctx)
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
            is_target[torch.arange(0, rest.numel(), step, device=device)[:ctx]] = True
            targets, others = rest[is_target], rest[~is_target]
            keys = unit_rows(signals.require("vision_keys"))
            nearest = (keys[others] @ keys[targets].T).argmax(dim=1) if others.numel() else others
            base = first + patches
            target[targets] = base + torch.arange(ctx, device=device)
            target[others] = base + nearest
            x = wide(state.hidden)
            sums = torch.zeros(ctx, x.shape[1], dtype=x.dtype, device=device).index_add_(
                0, nearest, x[others])
            counts = torch.bincount(nearest, minlength=ctx).to(x.dtype).clamp_min(1.0)
            hidden.append((x[targets] + sums / counts[:, None]).to(state.hidden.dtype))
            representative.append(targets)
        return state.regroup(target, torch.cat(hidden), torch.cat(representative))
