"""The built-in modules that register themselves (placements, the ProxyV stage), found as the package's
own ``lmmsqueeze.builtins`` entry points (``pyproject.toml``).

The registries import them on first use, so that ``import lmmsqueeze`` and the CLI start without torch;
reading their names from the package metadata keeps the low-level registries free of imports of the
modules above them (``compose`` and ``reducers`` name no runtime module and no method).
"""

from __future__ import annotations

import importlib
import importlib.metadata

from .errors import RegistryError

GROUP = "lmmsqueeze.builtins"
_loaded = False


def load_builtins() -> None:
    """Import every built-in module once, in the order of their entry-point names."""
    global _loaded
    if _loaded:
        return
    entries = sorted(importlib.metadata.entry_points(group=GROUP), key=lambda ep: ep.name)
    if not entries:
        raise RegistryError(f"lmmsqueeze's built-in modules are not registered ({GROUP} entry points); "
                            "install the package (pip install -e .) rather than running it from a bare tree")
    _loaded = True  # before importing: a built-in module may use a registry while it loads
    for ep in entries:
        importlib.import_module(ep.value)
