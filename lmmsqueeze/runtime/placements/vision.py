"""The ``vision`` placement: on the vision features at the projector's input (per image, every crop)."""

from __future__ import annotations

from typing import Any, ClassVar

from ...compose.geometry import ModelGeometry
from ...compose.placements import Placement, register_placement
from ...compose.plan import PlannedStage
from ...reducers.base import VISION_SIGNALS


class VisionPlacement(Placement):
    """Before the projector: a stage reduces the vision tower's feature tokens, which the projector
    then maps (each survivor on its own) to LLM embeddings; the only place the [CLS] feature exists."""

    name: ClassVar[str] = "vision"
    order: ClassVar[int] = 0
    before_llm: ClassVar[bool] = True
    signals: ClassVar[frozenset[str]] = VISION_SIGNALS
    where: ClassVar[str] = "at the vision placement"
    hint: ClassVar[str] = "run it there (at=vision)"

    def feature_width(self, g: ModelGeometry) -> int:
        return g.vision_hidden_size * g.vision_merge  # Qwen2-VL: a merge unit's patches side by side

    def install(self, run: Any, hooks: Any, stages: list[PlannedStage]) -> None:
        run.images.input_stages = stages


register_placement(VisionPlacement())
