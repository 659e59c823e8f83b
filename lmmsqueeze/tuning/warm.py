"""Warm start: a new study first tries the default sweep grid's pipelines that fit the budget.

Each such pipeline is written as the trial parameters the space would draw for it (counts become the
fractions the ranges hold: ``dominant=27`` of 144 tokens is 0.1875) and enqueued, so the sampler
starts from the hand-picked points of the field and searches beyond them. A pipeline the space cannot
express (a reducer or placement it leaves out, a value outside a narrowed range, more stages than
``max_stages``) is skipped.
"""

from __future__ import annotations

from typing import Any

from ..compose import compile_pipeline
from ..compose.geometry import ModelGeometry
from ..errors import LmmsqueezeError
from ..evaluation.sweep import default_items
from .space import Space


def _inside(value: Any, r: Any) -> bool:
    if r.kind == "choice":
        return value in r.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and r.low <= value <= r.high


def params_for(pipeline: str, adapter: str | None, space: Space, geometry: ModelGeometry
               ) -> dict[str, Any] | None:
    """The trial parameters that draw ``pipeline`` (with ``adapter``) from ``space``, or None."""
    try:
        plan = compile_pipeline(pipeline, geometry)
    except LmmsqueezeError:
        return None
    stages = [s for s in plan.stages if s.name != "proxyv" and (s.part is None or s.part[0] == 1)]
    if len(stages) > space.max_stages or (adapter or None) not in (None, *space.adapters):
        return None
    if any(s.name == "proxyv" for s in plan.stages) != bool(adapter):
        return None
    params: dict[str, Any] = {"stages": len(stages)} if space.options else {}
    for i, stage in enumerate(stages):
        key = f"{stage.name}@{stage.placement}"
        option = next((o for o in space.options if o.key == key), None)
        if option is None:
            return None
        params[f"s{i}"] = key
        given = dict(stage.spec.params)
        if any(given.get(k) != v for k, v in option.fixed.items()):
            return None
        for name, r in option.ranges.items():
            value = given.get(name, stage.layer if name == "layer" else None)
            if r.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = value / stage.tokens_in  # a count as the fraction the range holds
            if not _inside(value, r):
                return None
            params[f"s{i}.{key}.{name}"] = value
    if space.adapters:
        params["proxyv"] = adapter or "none"
    return params


def warm_start(study: Any, model: str, space: Space, geometry: ModelGeometry) -> int:
    """Enqueue the default grid's pipelines the space can draw into a study that has no trial yet (the
    objective then rejects those over the budget, unrun, like any candidate); returns how many."""
    if study.get_trials(deepcopy=False):
        return 0
    count = 0
    for item in default_items(model):
        params = params_for(item.pipeline, item.adapter, space, geometry)
        if params is not None:
            study.enqueue_trial(params, user_attrs={"warm_start": item.label})
            count += 1
    return count


__all__ = ["params_for", "warm_start"]
