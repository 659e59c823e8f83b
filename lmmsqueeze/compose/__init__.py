"""The pipeline language, its validator and planner (no tensors here)."""

from .geometry import PRESETS, ModelGeometry, geometry_from_config, geometry_from_path, preset
from .plan import Plan, PlannedStage, compile_pipeline, resolve_geometry
from .spec import PipelineSpec, StageSpec, expand_lists, format_value, parse_pipeline, pipeline_from_data

__all__ = [
    "PRESETS",
    "ModelGeometry",
    "PipelineSpec",
    "Plan",
    "PlannedStage",
    "StageSpec",
    "compile_pipeline",
    "expand_lists",
    "format_value",
    "geometry_from_config",
    "geometry_from_path",
    "parse_pipeline",
    "pipeline_from_data",
    "preset",
    "resolve_geometry",
]
