"""Everything that executes a plan on a transformers model: the run and its hook installer, the
prefill rewrite, the built-in placements, loading and measuring."""

from . import placements  # noqa: F401  (registers the vision, projector and llm placements)
from .hooks import HookSet, count_hooks
from .loading import build_prompt, load_model, pick_device
from .run import PipelineRun, Prepared, apply, prepare

__all__ = [
    "HookSet",
    "PipelineRun",
    "Prepared",
    "apply",
    "build_prompt",
    "count_hooks",
    "load_model",
    "pick_device",
    "prepare",
]
