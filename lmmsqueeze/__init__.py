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

from typing import Any

from . import proxyv, reducers  # noqa: F401  (registers the built-in reducers and the proxyv stage)
from .compose import ModelGeometry, PipelineSpec, Plan, compile_pipeline, parse_pipeline
from .errors import LmmsqueezeError, ModelError, PipelineError, RegistryError
from .models import Family, family_for, geometry_of, register_family
from .reducers import (
    Reducer,
    ScoredPruner,
    Signals,
    TokenState,
    create_reducer,
    get_reducer,
    list_reducers,
    register_reducer,
)
from .runtime import Prepared, apply, load_model, prepare

__version__ = "0.2.0"


def compile(pipeline: str | PipelineSpec | None, model_or_config: Any = None) -> Plan:  # noqa: A001
    """Validate and plan a pipeline for a model, a transformers config, a geometry or a preset name.

    Raises :class:`PipelineError` with a one-line reason when the pipeline is refused.
    """
    return compile_pipeline(pipeline, geometry_of(model_or_config))


__all__ = [
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
]
