"""Everything that executes a plan on a transformers model: the hook installer, the prefill runtime,
loading and measuring."""

from .hooks import HookSet, count_hooks
from .loading import build_prompt, load_model, pick_device
from .runtime import PipelineRun, apply, compile_for

__all__ = [
    "HookSet",
    "PipelineRun",
    "apply",
    "build_prompt",
    "compile_for",
    "count_hooks",
    "load_model",
    "pick_device",
]
