"""What the runtime keeps about one prefill: each image through the pre-LLM stages, each sample's image
tokens inside the decoder, and the layer segments between ``llm`` stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..compose.plan import PlannedStage
from ..reducers.base import TokenState
from .positions import grid_offsets


@dataclass
class ImageRecord:
    """One image's tokens through the pre-LLM stages, and the positions they take.

    ``offsets`` (``[n, R]``, R = 1 for 1-D RoPE, 3 for M-RoPE) is each current token's position
    relative to its image's first position and ``span`` the positions the image occupies (text after
    it follows); ``span_in`` is what the processor's prompt gave. Separator placeholders (LLaVA-NeXT's
    newline tokens) are never image tokens: ``separators`` marks them in the processor's run,
    ``sep_before`` counts the original tokens before each and ``sep_offsets`` holds their offsets.
    """

    state: TokenState
    vision: dict[str, Tensor]  # vision signals with one row per original token
    extras: dict[str, Tensor]  # per-image vision signals (the [CLS] features)
    offsets: Tensor
    span: int
    history: list[TokenState] = field(default_factory=list)  # the state after each pre-LLM stage
    crops: int = 1  # crops of the image (crop ids of its tokens are 0..crops-1)
    separators: Tensor | None = None
    separator_values: Tensor | None = None  # [k, D] the separators' features
    sep_offsets: Tensor | None = None
    span_in: int = 0

    def __post_init__(self) -> None:
        self.span_in = self.span_in or self.span
        if self.separators is not None and self.sep_offsets is None:
            self.sep_offsets = torch.nonzero(self.separators).flatten()

    @classmethod
    def of(cls, state: TokenState, vision: dict[str, Tensor], extras: dict[str, Tensor], rows: int,
           separators: Tensor | None = None, separator_values: Tensor | None = None,
           crops: int = 1) -> ImageRecord:
        """A fresh image: tokens in processor order (1-D offsets: each token's place in the run)."""
        device = state.hidden.device
        if rows == 3:
            offsets, span = grid_offsets(state.grids, 3, device)
        elif separators is not None:
            offsets, span = torch.nonzero(~separators).flatten()[:, None], int(separators.numel())
        else:
            offsets, span = torch.arange(state.n, device=device)[:, None], state.n
        return cls(state, vision, extras, offsets, span, crops=crops, separators=separators,
                   separator_values=separator_values)

    @property
    def run_in(self) -> int:
        """Placeholders of the image in the prompt as the processor built it."""
        return self.state.n_original + (0 if self.separators is None else int(self.separators.sum()))

    @property
    def run_out(self) -> int:
        """Placeholders of the image after the pre-LLM stages."""
        return self.state.n + (0 if self.separators is None else int(self.separators.sum()))

    def layout(self, state: TokenState | None = None) -> Tensor | None:
        """``[run_out]`` True at the separators of the reduced run: each separator after the kept tokens
        whose original index comes before it (tokens made from no single one count as before)."""
        if self.separators is None:
            return None
        state = self.state if state is None else state
        before = torch.cumsum(~self.separators, 0)[self.separators]  # original tokens before each separator
        kept_before = (state.index[None, :] < before[:, None]).sum(1)
        at = kept_before + torch.arange(before.numel(), device=before.device)
        marks = torch.zeros(state.n + before.numel(), dtype=torch.bool, device=before.device)
        marks[at] = True
        return marks

    def apply(self, new: TokenState, positions: str) -> None:
        """Take a stage's output: survivors keep their representatives' offsets (``keep``), or the run is
        numbered afresh (``renumber``): 1-D RoPE counts the run; M-RoPE numbers an image that is still a
        grid as that grid, and otherwise keeps each token's offset and shrinks the span to the largest."""
        src = new.sources()
        offsets = self.offsets[src.clamp(min=0)].clone()
        offsets[src < 0] = 0
        if positions == "renumber":
            # numbered as that grid
            if offsets.shape[1] == 3 and new.grids is not None and len(new.grids) == 1:
                offsets, self.span = grid_offsets(new.grids, 3, offsets.device)
            elif offsets.shape[1] == 3:
                self.span = int(offsets.max()) + 1 if offsets.numel() else 0
            elif self.separators is None:
                offsets = torch.arange(new.n, device=offsets.device)[:, None]
                self.span = new.n
            else:
                marks = self.layout(new)
                offsets = torch.nonzero(~marks).flatten()[:, None]
                self.sep_offsets = torch.nonzero(marks).flatten()
                self.span = int(marks.numel())
        self.offsets = offsets
        self.state = new
        self.history.append(new)

    def run_offsets(self) -> Tensor:
        """``[run_out, R]`` the offsets of the reduced run's placeholders in order (separators included)."""
        marks = self.layout()
        if marks is None:
            return self.offsets
        out = self.offsets.new_empty(marks.numel(), self.offsets.shape[1])
        out[~marks] = self.offsets
        out[marks] = self.sep_offsets[:, None].to(out.dtype)
        return out


@dataclass
class Sample:
    """One sample's image tokens inside the decoder (hidden states live in the sequence)."""

    slots: Tensor  # [n] column of each current image token in the current sequence, in state order
    meta: TokenState  # index/sizes/crops/grids/assign of the current tokens (hidden is a placeholder)
    vision: dict[str, Tensor]  # vision signals over the sample's original image tokens
    image_of_crop: Tensor  # [crops] the image (0, 1, ... in the prompt) each crop id belongs to


@dataclass
class Segment:
    """Layers from an llm stage's layer to the next: which prefill columns they hold and their positions."""

    stage: PlannedStage
    keep: Tensor  # [B, n] columns of the prefill sequence kept from this layer on
    source: Tensor  # [B, n] the prefill column of each kept column's token (its representative's)
    ids: Tensor  # [R, B, n] the position ids of those columns (R = 3 for M-RoPE)
    delta: Tensor  # [B] how far this segment's next position is below the first segment's (decode steps)
    alive: Tensor | None = None  # [B, n] False at filler columns (masked everywhere), None: all real
    position_embeddings: tuple[Tensor, Tensor] | None = None
    position_ids: Tensor | None = None
    # The model hands every layer of a forward the same mask object (one per layer type), so a segment
    # slices each one once: (decoding, the model's mask, key length, the sliced mask) of this forward.
    masks: list[tuple[bool, Any, int, Any]] = field(default_factory=list)
    # and the same cos/sin: at decode steps they are shifted by ``delta`` once per step
    ropes: list[tuple[Any, tuple[Tensor, Tensor]]] = field(default_factory=list)

    def sliced_mask(self, decoding: bool, source: Any, length: int, make: Any) -> Any:
        for phase, seen, n, sliced in self.masks:
            if phase == decoding and seen is source and n == length:
                return sliced
        sliced = make()
        self.masks = [m for m in self.masks if m[0] == decoding and m[2] == length] + [
            (decoding, source, length, sliced)]
        return sliced

    def shifted_rope(self, source: tuple[Tensor, Tensor], make: Any) -> tuple[Tensor, Tensor]:
        for seen, shifted in self.ropes:
            if seen is source[0]:
                return shifted
        shifted = make()
        self.ropes = [(source[0], shifted)]
        return shifted


@dataclass
class Prefill:
    """State of the current generation: set at prefill, read by every later decode step."""

    batch: int
    length: int  # prefill length after any placeholder rewrite
    padding: Tensor  # [B, length] True for real tokens
    source_columns: Tensor  # [B, length] input column of every prefill column (-1: added padding)
    rewritten: bool
    new_mask: Tensor | None  # [B, length] the prompt's 2-D mask after the rewrite
    input_length: int  # prompt length as the caller sees it
    removed: Tensor  # [B] prompt tokens removed by the rewrite
    shift: Tensor  # [B] the caller's next position minus the rewritten prompt's (decode steps)
    samples: list[Sample]
    segments: list[Segment] = field(default_factory=list)
    llm_signals: dict[int, dict[str, Any]] = field(default_factory=dict)  # stage layer K -> probes at K-1
    mrope: Tensor | None = None  # [3, B, length] M-RoPE ids of the prefill columns (Qwen2-VL families)
    # [R, B, length] position ids of the prefill columns (set at the first llm stage)
    ids: Tensor | None = None
    relevance: list[Tensor] | None = None  # per sample: text_relevance at the decoder input
    decoding: bool = False

    def segment_for(self, layer: int) -> Segment | None:
        seg = None
        for s in self.segments:
            if s.stage.layer <= layer:
                seg = s
        return seg

    def current_padding(self, layer: int) -> Tensor:
        seg = self.segment_for(layer)
        if seg is None:
            return self.padding
        kept = self.padding.gather(1, seg.keep)
        return kept if seg.alive is None else kept & seg.alive


def rows_of(value: Tensor, index: Tensor) -> Tensor:
    """A signal's rows of the tokens' originals (``index``); zeros for tokens made from no single one."""
    rows = value[index.clamp(min=0)]
    if not bool((index < 0).any()):
        return rows
    return rows.masked_fill((index < 0).view(-1, *([1] * (rows.dim() - 1))), 0)
