"""ProxyV: proxy tokens take the image tokens' heavy computation from layer L on (spatial and
non-spatial variants), the light VisionMLPs that update the full tokens, adapters and training."""

from . import placement  # noqa: F401  (registers the proxyv placement)
from .modules import ProxyInitializer, ProxyVAdapter, ProxyVConfig, VisionMLP
from .stage import ProxyV

__all__ = ["ProxyInitializer", "ProxyV", "ProxyVAdapter", "ProxyVConfig", "VisionMLP"]
