"""DART: pivot tokens by key norm, then the tokens least similar to each pivot (duplicates dropped)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import unit_rows
from .base import Grids, Reducer, Signals, TokenState, check_keep, check_layer, top_k_slots, wide
from .registry import register_reducer
from .search import LAST_LAYER, searchable


@register_reducer(
    "dart",
    family="pruning",
    placements=("llm",),
    needs=("llm_keys", "text_keys", "normed_hidden", "text_normed_hidden", "sequence_index",
           "text_sequence_index"),
    keeps_grid=False,
    cite="Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication "
    "Matters More (DART), EMNLP 2025",
    code="ZichenWen1/DART, llava/model/language_model/modeling_llama_self.py::DART.get_retained_image_token "
    "(defaults: llava/eval/model_vqa_loader.py)",
    fidelity="exact (with fewer than text_pivots tokens after the image, where the released code fails, the "
    "pivots present take the missing ones' picks in turn)",
)
@dataclass(frozen=True)
class DARTReducer(Reducer):
    """At decoder layer ``layer``: ``pivots`` image tokens and ``text_pivots`` prompt tokens after the
    image with the largest L1 norm of their layer K-1 keys (after RoPE) are pivots; each pivot, in the
    order the released code meets them (a Python set of their sequence indices), picks the
    ``keep // (pivots + text_pivots)`` not-yet-chosen image tokens least cosine-similar to it, on the
    hidden states through the model's final norm. The image pivots and every pick survive (paper: K=2,
    4 + 4 pivots, ``max_num_trunction`` 128, so 4 + 8 x 16 = 132 of 576 kept).

    ``keep`` is the tokens the pivots pick in all (``max_num_trunction``); a fraction is of the image
    tokens (``1 - reduction_ratio``). No attention weights are needed. Survivors keep their original
    positions.
    """

    keep: int | float = searchable(128, low=0.02, high=0.9, log=True)
    layer: int = searchable(2, low=1, high=LAST_LAYER)
    pivots: int = searchable(4, low=1, high=8)
    text_pivots: int = searchable(4, low=0, high=8)

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_layer(self.layer, minimum=1, why="DART reads the keys of layer K-1")
        if isinstance(self.pivots, bool) or self.pivots < 1:
            raise ValueError(f"pivots={self.pivots} must be an integer >= 1 (paper: 4 image pivots)")
        if isinstance(self.text_pivots, bool) or self.text_pivots < 0:
            raise ValueError(f"text_pivots={self.text_pivots} must be an integer >= 0 (paper: 4 text pivots)")

    def check_input(self, n: int, grids: Grids) -> None:
        super().check_input(n, grids)
        if self.pivots >= n:
            raise ValueError(f"pivots={self.pivots} is not fewer than the {n} image tokens this stage "
                             f"receives, so nothing is pruned; give pivots < {n} (paper: 4)")

    def _per_pivot(self, n: int) -> int:
        budget = self.keep if isinstance(self.keep, int) else n * self.keep
        return math.ceil(budget // (self.pivots + self.text_pivots))

    def output_count(self, n: int, grids: Grids) -> int:
        pivots = min(self.pivots, n)
        return min(n, pivots + self._per_pivot(n) * (self.pivots + self.text_pivots))

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        if self.output_count(n, grids) >= n:
            return 0
        return (self.pivots + self.text_pivots) * n * dim  # each pivot against every image token

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k = self.output_count(state.n, state.grids)
        if k >= state.n:
            return state
        n_img = min(self.pivots, state.n)
        image_pivots = top_k_slots(wide(signals.require("llm_keys")).abs().sum(dim=1), n_img)
        text_keys = signals.require("text_keys")
        text_rows = top_k_slots(wide(text_keys).abs().sum(dim=1), min(self.text_pivots, text_keys.shape[0]))
        image_at = signals.require("sequence_index")[image_pivots]
        text_at = signals.require("text_sequence_index")[text_rows]
        where = {int(i): ("image", int(s)) for i, s in zip(image_at, image_pivots, strict=True)}
        where.update({int(i): ("text", int(r)) for i, r in zip(text_at, text_rows, strict=True)})
        order = [where[i] for i in list(set(where))]  # the released code walks a Python set of indices
        image = unit_rows(signals.require("normed_hidden"))
        text = unit_rows(signals.require("text_normed_hidden"))
        chosen = torch.zeros(state.n, dtype=torch.bool, device=image.device)
        chosen[image_pivots] = True
        per, left = self._per_pivot(state.n), k - n_img
        while left > 0 and order:
            for kind, row in order:
                take = min(per, left)
                if take <= 0:
                    break
                pivot = image[row] if kind == "image" else text[row]
                similarity = (image @ pivot[:, None])[:, 0].masked_fill(chosen, float("inf"))
                chosen[top_k_slots(-similarity, take)] = True
                left -= take
            if len(order) == self.pivots + self.text_pivots:
                break
        return state.select(torch.nonzero(chosen).flatten())
