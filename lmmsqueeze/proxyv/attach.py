"""Matching ProxyV adapters to a model and a plan."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundled import WEIGHTS_DIR
from ..compose.spec import parse_pipeline
from ..errors import ModelError
from ..reducers.registry import build_reducer
from .modules import ProxyVAdapter, ProxyVConfig, check_adapter_dir, read_config
from .stage import proxyv_stage

#: adapters shipped with the bundled model, addressable as `bundled:<name>`
BUNDLED_ADAPTERS = ("proxyv-spatial", "proxyv-nonspatial")


def adapter_path(ref: str | Path) -> Path:
    """A directory for an adapter reference: a path, or ``bundled:<name>``."""
    ref = str(ref)
    if ref.startswith("bundled:"):
        name = ref.split(":", 1)[1]
        if name not in BUNDLED_ADAPTERS:
            raise ModelError(f"unknown bundled adapter {name!r}; shipped: {', '.join(BUNDLED_ADAPTERS)}")
        return Path(WEIGHTS_DIR).parent / "adapters" / name
    return Path(ref)


def adapter_pipeline(adapter: str) -> str:
    """The pipeline an adapter was trained for (recorded in its config)."""
    return read_config(adapter_path(adapter)).get("pipeline") or ""


def pipeline_for(pipeline: str, adapter: str | None) -> str:
    """``pipeline``, or the adapter's own when there is an adapter and the pipeline is empty/none.

    What can be checked before a model loads is checked here (callers use it before they touch a
    results store): the adapter's files (:func:`check_adapter_dir`), and a proxyv stage without an
    adapter (refused unless it says ``untrained=true``, as :func:`resolve_adapter` would).
    """
    if adapter:
        config = check_adapter_dir(adapter_path(adapter))
        if str(pipeline).strip() in ("", "none"):
            return adapter_pipeline(adapter)
        for position, stage in enumerate(parse_pipeline(pipeline).stages, 1):
            if stage.name == "proxyv":
                _fits(config, build_reducer("proxyv", stage.params, f"stage {position} (proxyv)"), adapter)
        return pipeline
    for position, stage in enumerate(parse_pipeline(pipeline).stages, 1):
        if stage.name == "proxyv" and _needs_weights(stage.params.get("untrained") is True):
            raise ModelError(_no_weights(position))
    return pipeline


def _fits(config: ProxyVConfig, stage: Any, adapter: Any) -> None:
    """An adapter config against a proxyv stage's own parameters (the model's shapes wait for the model)."""
    for name in ("layer", "variant", "factor", "proxies"):
        if (name == "factor" and config.variant != "spatial") or (name == "proxies" and
                                                                   config.variant != "nonspatial"):
            continue
        if getattr(config, name) != getattr(stage, name):
            mine, theirs = getattr(config, name), getattr(stage, name)
            raise ModelError(f"the ProxyV adapter {str(adapter)!r} does not fit this pipeline or model: "
                             f"{name}: the adapter has {mine}, the pipeline needs {theirs}; omit the "
                             "pipeline to run the adapter's own")


def _no_weights(position: int) -> str:
    return (f"stage {position} (proxyv) needs trained ProxyV weights: pass --adapter DIR (the bundled model "
            f"ships {', '.join('bundled:' + a for a in BUNDLED_ADAPTERS)}; weights= in Python), or add "
            "untrained=true to the stage to run freshly initialised modules on purpose")


def config_for(model: nn.Module, plan: Any) -> ProxyVConfig:
    """The adapter config a plan's ProxyV stage needs on ``model``."""
    stage = proxyv_stage(plan)
    text = model.config.get_text_config()
    g = plan.geometry
    return ProxyVConfig(
        layer=stage.layer, variant=stage.reducer.variant, factor=stage.reducer.factor,
        proxies=stage.reducer.proxies, hidden_size=g.hidden_size, width=stage.reducer.width(g.hidden_size),
        num_layers=g.num_layers, rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
        base_model=g.name, pipeline=plan.canonical,
    )


_ALLOW_UNTRAINED: list[bool] = [False]


def _needs_weights(untrained: bool) -> bool:
    """A proxyv stage without an adapter is refused unless it says ``untrained=true`` or runs inside
    :func:`allow_untrained` (the one rule :func:`pipeline_for` and :func:`resolve_adapter` apply)."""
    return not (untrained or _ALLOW_UNTRAINED[-1])


@contextlib.contextmanager
def allow_untrained(allow: bool = True) -> Iterator[None]:
    """Within the block, a proxyv stage without an adapter runs freshly initialised modules (seed 0), as
    if it said ``untrained=true`` (``allow=False``: refused again). For test suites that run many
    pipelines on random models; a user asks for untrained modules with ``untrained=true`` in the stage."""
    _ALLOW_UNTRAINED.append(allow)
    try:
        yield
    finally:
        _ALLOW_UNTRAINED.pop()


def resolve_adapter(model: nn.Module, plan: Any, adapter: Any) -> ProxyVAdapter | None:
    """The ProxyV modules for a plan: the given adapter (checked), or fresh ones (seed 0) when the
    stage says ``untrained=true``; None when the plan runs no ProxyV layer.

    Raises:
        ModelError: no adapter for a stage that needs one, an adapter for an ``untrained=true`` stage,
            or an adapter that cannot be read or does not fit the plan and model.
    """
    stage = proxyv_stage(plan)
    if stage is None:
        return None
    untrained = bool(stage.reducer.untrained)
    if adapter is None and _needs_weights(untrained):
        raise ModelError(_no_weights(stage.position))
    if adapter is not None and untrained:
        raise ModelError(f"stage {stage.position} (proxyv) says untrained=true, but an adapter was given; "
                         "remove untrained=true to run the adapter, or the adapter to run fresh modules")
    needed = config_for(model, plan)
    if adapter is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = ProxyVAdapter(needed)
    else:
        module = adapter if isinstance(adapter, ProxyVAdapter) else ProxyVAdapter.load(adapter_path(adapter),
                                                                                         expect=needed)
        problem = module.config.mismatch(needed)
        if problem:
            raise ModelError(f"the ProxyV adapter does not fit this pipeline or model: {problem}")
    param = next(model.parameters())
    return module.to(device=param.device, dtype=param.dtype)


def provenance(adapter: Any) -> dict[str, Any]:
    """How an adapter (a reference or a loaded :class:`ProxyVAdapter`) was trained, for result rows:
    ``adapter_objective`` (``distill`` or ``task``) and, for a task-trained one with a trained control,
    ``adapter_control`` (the control's directory)."""
    if adapter is None:
        return {}
    if isinstance(adapter, ProxyVAdapter):
        return {"adapter_objective": adapter.config.objective or None}
    config = read_config(adapter_path(adapter))
    out: dict[str, Any] = {"adapter_objective": config.get("objective") or None}
    if config.get("control"):
        out["adapter_control"] = control_ref(adapter, config["control"])
    return out


def control_ref(adapter: Any, relative: str) -> str:
    """The directory of an adapter's control (recorded relative to the adapter), normalised."""
    return str((adapter_path(adapter) / relative).resolve())


def same_adapter(a: Any, b: Any) -> bool:
    """Whether two adapter references name the same directory."""
    try:
        return adapter_path(a).resolve() == adapter_path(b).resolve()
    except ModelError:
        return False
