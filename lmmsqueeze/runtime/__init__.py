"""Everything that touches a transformers model: adapters, hooks, probes, the prefill runtime."""

from .adapters import LlavaAdapter, LlavaNextAdapter, ModelAdapter, PackedImage, adapter_for
from .hooks import HookSet, count_hooks
from .loading import build_prompt, load_model, pick_device
from .runtime import PipelineRun, apply, compile_for

__all__ = [
    "HookSet",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "ModelAdapter",
    "PackedImage",
    "PipelineRun",
    "adapter_for",
    "apply",
    "build_prompt",
    "compile_for",
    "count_hooks",
    "load_model",
    "pick_device",
]
