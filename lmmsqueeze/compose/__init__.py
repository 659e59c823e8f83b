"""The pipeline language, its validator and planner (no tensors here)."""

from .geometry import ModelGeometry
from .plan import Plan, PlannedStage, compile_pipeline
from .spec import PipelineSpec, StageSpec, expand_lists, format_value, parse_pipeline, pipeline_from_data

__all__ = [
    "ModelGeometry",
    "PipelineSpec",
    "Plan",
    "PlannedStage",
    "StageSpec",
    "compile_pipeline",
    "expand_lists",
    "format_value",
    "parse_pipeline",
    "pipeline_from_data",
]
