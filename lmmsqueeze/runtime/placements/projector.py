"""The ``projector`` placement: on the projected image tokens, before the LLM (per image)."""

from __future__ import annotations

from typing import Any, ClassVar

from ...compose.placements import Placement, register_placement
from ...compose.plan import PlannedStage
from ...reducers.base import VISION_SIGNALS


class ProjectorPlacement(Placement):
    """After the projector: a stage reduces each image's LLM embeddings before they enter the prompt."""

    name: ClassVar[str] = "projector"
    order: ClassVar[int] = 1
    before_llm: ClassVar[bool] = True
    signals: ClassVar[frozenset[str]] = VISION_SIGNALS - {"cls_hidden"}
    where: ClassVar[str] = "before the LLM"
    hint: ClassVar[str] = "run it at the projector"

    def install(self, run: Any, hooks: Any, stages: list[PlannedStage]) -> None:
        run.images.output_stages = stages


register_placement(ProjectorPlacement())
