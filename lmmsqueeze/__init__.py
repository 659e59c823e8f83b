"""lmmsqueeze: composable visual-token reducers and ProxyV for LLaVA-style models.

The Python API (what the CLI uses)::

    import lmmsqueeze
    model, processor = lmmsqueeze.load_model("path/to/llava")       # or "bundled"
    plan = lmmsqueeze.compile("pool | fastv(layer=2, keep=0.5)", model)
    with lmmsqueeze.apply(model, plan) as run:
        out = model.generate(**inputs, max_new_tokens=16)
    run.trace                                                        # survivors per stage and sample
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Names load on first use (PEP 562), so that `import lmmsqueeze.cli` (and `lmmsqueeze --help`) does not
# import torch and transformers. The built-in reducers, placements and the proxyv stage register
# themselves when the placements or the registry are first used (lmmsqueeze.compose.placements,
# lmmsqueeze.reducers.registry.load_plugins).
_LAZY = {
    "ModelGeometry": "compose", "PipelineSpec": "compose", "Plan": "compose", "compile_pipeline": "compose",
    "parse_pipeline": "compose",
    "LmmsqueezeError": "errors", "ModelError": "errors", "PipelineError": "errors", "RegistryError": "errors",
    "Family": "models", "family_for": "models", "geometry_of": "models", "register_family": "models",
    "Reducer": "reducers", "ScoredPruner": "reducers", "Signals": "reducers", "TokenState": "reducers",
    "create_reducer": "reducers", "get_reducer": "reducers", "list_reducers": "reducers",
    "register_reducer": "reducers", "searchable": "reducers", "LAST_LAYER": "reducers",
    "Prepared": "runtime", "apply": "runtime", "load_model": "runtime", "prepare": "runtime",
}

if TYPE_CHECKING:
    from .compose import ModelGeometry, PipelineSpec, Plan, parse_pipeline
    from .errors import LmmsqueezeError, ModelError, PipelineError, RegistryError
    from .models import Family, family_for, register_family
    from .reducers import (
        LAST_LAYER,
        Reducer,
        ScoredPruner,
        Signals,
        TokenState,
        create_reducer,
        get_reducer,
        list_reducers,
        register_reducer,
        searchable,
    )
    from .runtime import Prepared, apply, load_model, prepare


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a subpackage, e.g. lmmsqueeze.proxyv
        raise AttributeError(f"module 'lmmsqueeze' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def compile(pipeline: str | PipelineSpec | None, model_or_config: Any = None) -> Plan:  # noqa: A001
    """Validate and plan a pipeline for a model, a transformers config, a geometry or a preset name.

    Raises :class:`PipelineError` with a one-line reason when the pipeline is refused.
    """
    from .compose import compile_pipeline
    from .models import geometry_of

    return compile_pipeline(pipeline, geometry_of(model_or_config))


__all__ = [
    "LAST_LAYER",
    "Family",
    "LmmsqueezeError",
    "ModelError",
    "ModelGeometry",
    "PipelineError",
    "PipelineSpec",
    "Prepared",
    "Plan",
    "Reducer",
    "RegistryError",
    "ScoredPruner",
    "Signals",
    "TokenState",
    "apply",
    "compile",
    "create_reducer",
    "family_for",
    "get_reducer",
    "list_reducers",
    "load_model",
    "parse_pipeline",
    "prepare",
    "register_family",
    "register_reducer",
    "searchable",
]
