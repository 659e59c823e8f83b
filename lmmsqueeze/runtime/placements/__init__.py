"""The runtime's built-in placements, one file each (ProxyV registers its own:
:mod:`lmmsqueeze.proxyv.placement`)."""

from . import llm, projector, vision  # noqa: F401  (each registers its placement)
from .llm import LlmPlacement
from .projector import ProjectorPlacement
from .vision import VisionPlacement

__all__ = ["LlmPlacement", "ProjectorPlacement", "VisionPlacement"]
