"""FasterVLM: keep the patches the vision tower's [CLS] token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import ScoredPruner, Signals, TokenState
from .registry import register_reducer
from .search import searchable


@register_reducer(
    "fastervlm",
    family="pruning",
    placements=("vision",),
    needs=("cls_attention",),
    keeps_grid=False,
    cite="Zhang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning "
    "(FasterVLM), arXiv 2412.01818",
    code="Theia-4869/FasterVLM, llava/model/llava_arch.py::encode_images",
    fidelity="exact on one-crop images; approx on LLaVA-NeXT (the budget is split across the base crop "
    "and the sub-crop grid by their token counts) and on Qwen2-VL (no [CLS]: a stand-in)",
)
@dataclass(frozen=True)
class FasterVLMReducer(ScoredPruner):
    """Keep the ``keep`` patches with the highest head-mean [CLS] attention at the vision feature layer,
    in their original order (paper: the penultimate layer; 90% reduction keeps 58 of 576).

    Runs on the vision features before the projector (the released code projects all tokens and
    drops the same ones afterwards: the same tokens survive, at a higher projector cost). With
    several crops (LLaVA-NeXT) it keeps its share in every crop, as the released code applies the
    same ratio per crop: here per grid (the base crop, and the sub-crop grid whose four crops'
    [CLS] attentions are compared together).
    """

    per_crop = True
    keep: int | float = searchable(0.1, low=0.02, high=0.9, log=True)

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        return signals.require("cls_attention")
