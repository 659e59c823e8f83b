"""The compiler: a pipeline spec + a model geometry -> a validated :class:`Plan`.

Every refusal is a :class:`~lmmsqueeze.errors.PipelineError` whose one-line message names the
stage, the bad value, the valid range and the fix. No tensors are touched here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PipelineError
from ..reducers.base import POSITION_POLICIES, Reducer
from ..reducers.registry import build_reducer, reducer_params
from .flops import Cost, plan_cost
from .geometry import ModelGeometry
from .placements import Placement, PlannedStage, get_placement, placements
from .spec import PipelineSpec, StageSpec, parse_pipeline


@dataclass(frozen=True)
class Plan:
    """A compiled pipeline: stages in execution order and the image tokens entering every layer."""

    spec: PipelineSpec
    stages: tuple[PlannedStage, ...]
    geometry: ModelGeometry

    @property
    def canonical(self) -> str:
        """The pipeline's identity: every parameter filled in, keys sorted."""
        return self.spec.format()

    @property
    def is_vanilla(self) -> bool:
        return not self.stages

    def at(self, placement: str) -> list[PlannedStage]:
        return [s for s in self.stages if s.placement == placement]

    @property
    def llm_image_tokens(self) -> int:
        """Image tokens (per single-image sample) that enter decoder layer 0."""
        pre = [s for s in self.stages if s.where.before_llm]
        return pre[-1].tokens_out if pre else self.geometry.image_tokens

    def tokens_per_layer(self) -> list[int]:
        """Image tokens entering each decoder layer, for a single-image sample."""
        counts, current = [], self.llm_image_tokens
        layered = {s.layer: s for s in self.stages if s.where.layered}
        for layer in range(self.geometry.num_layers):
            if layer in layered:
                current = layered[layer].tokens_out
            counts.append(current)
        return counts

    def cost(self, text_tokens: int = 64, convention: str = "exact", **kwargs: Any) -> Cost:
        """The analytic prefill cost of this plan for one sample (see :mod:`lmmsqueeze.compose.flops`)."""
        return plan_cost(self, text_tokens=text_tokens, convention=convention, **kwargs)

    def notes(self) -> list[str]:
        """How this model provides what the stages read, where it differs from the reducer's paper."""
        out = []
        readers = [s.name for s in self.stages if "cls_attention" in s.reducer.needs]
        if readers and self.geometry.cls_attention == "mean":
            names = ", ".join(dict.fromkeys(readers))
            out.append(f"{names}: {self.geometry.name or 'this model'} has no [CLS] token; "
                       "cls_attention is the mean attention each image token receives from its image's "
                       "tokens in the vision tower's last block (heads averaged, merged patches averaged)")
        return out

    def to_dict(self, text_tokens: int = 64, convention: str = "exact") -> dict[str, Any]:
        per_layer = self.tokens_per_layer()
        cost = self.cost(text_tokens, convention)
        return {
            "pipeline": self.canonical,
            "model": self.geometry.name,
            "image_tokens": self.geometry.image_tokens,
            "stages": [
                {
                    "position": s.position,
                    "stage": s.spec.format(),
                    "name": s.name,
                    "family": s.reducer.family,
                    "placement": s.placement,
                    "layer": s.layer,
                    "positions": None if s.where.keeps_tokens else s.positions,
                    "tokens_in": s.tokens_in,
                    "tokens_out": s.tokens_out,
                    "adaptive": s.adaptive,
                    "keeps_grid": s.grids_out is not None,
                    "part": list(s.part) if s.part else None,
                }
                for s in self.stages
            ],
            "notes": self.notes(),
            "image_tokens_avg": sum(per_layer) / len(per_layer) if per_layer else 0.0,
            "text_tokens": text_tokens,
            "convention": convention,
            "prefill_flops": cost.prefill_flops,
            "vanilla_prefill_flops": cost.vanilla_prefill_flops,
            "saving": cost.saving,
            "lm_head_flops": 2 * cost.lm_head,
            "parts_flops": {k: 2 * v for k, v in cost.parts().items()},
            "layers": [
                {"layer": lc.layer, "image_tokens": lc.image_tokens, "tokens": lc.tokens, "flops": lc.flops,
                 "macs": lc.macs, "projections_macs": lc.projections, "attention_macs": lc.attention,
                 "ffn_macs": lc.ffn, "overhead_macs": lc.overhead}
                for lc in cost.layers
            ],
        }


def reduced_after_kept(where: str, layer: int, keeper: str, kept_from: int) -> PipelineError:
    """A reducing stage at or after the layer from which a stage keeps every image token."""
    return PipelineError(
        f"{where}: an llm reducer at layer {layer} >= {kept_from} cannot run with {keeper} from layer "
        f"{kept_from}, which keeps every image token there; move the reducer below layer {kept_from} "
        f"or start {keeper} later"
    )


def canonical_stage(reducer: Reducer) -> StageSpec:
    """Every parameter of a reducer, defaults filled, keys sorted, unset (None) ones left out."""
    params = {}
    for name in sorted(reducer_params(type(reducer))):
        value = getattr(reducer, name)
        if value is not None:
            params[name] = value
    return StageSpec(reducer.name, params)


def compile_pipeline(pipeline: str | PipelineSpec | None, geometry: ModelGeometry,
                     observed: dict[int, int] | None = None) -> Plan:
    """Parse, validate and plan a pipeline for a model.

    Args:
        pipeline: pipeline text, ``@file.yaml|json``, a :class:`PipelineSpec`, or None (vanilla).
        geometry: the model's shapes (``lmmsqueeze.compile`` takes a model, a config or a preset name
            and reads them through its family).
        observed: for adaptive stages (whose output count depends on the data), the count a run saw,
            by stage index, in place of the reducer's estimate.

    Raises:
        PipelineError: with a one-line reason, for any refused pipeline.
    """
    if not isinstance(geometry, ModelGeometry):
        raise TypeError(f"compile_pipeline takes a ModelGeometry, not {type(geometry).__name__}; "
                        "lmmsqueeze.compile(pipeline, model_or_config) reads one from a model, config or "
                        "preset")
    spec = parse_pipeline(pipeline)
    if spec.has_lists:
        raise PipelineError(
            f"pipeline {spec.format()!r} holds a list of values; lists expand into several pipelines "
            "only in `lmmsqueeze sweep`"
        )
    stages: list[PlannedStage] = []
    tokens, grids = geometry.image_tokens, geometry.grids
    canonical_specs: list[StageSpec] = []
    for pos, stage in enumerate(spec.stages, 1):
        where = f"stage {pos} ({stage.name})"
        params = dict(stage.params)
        at = params.pop("at", None)
        positions = params.pop("positions", None)
        parent = build_reducer(stage.name, params, where)
        declared = _declared(parent, where)
        pre = [p.name for p in declared if p.before_llm]
        if positions is not None:
            if any(p.exclusive and p.keeps_tokens for p in declared):
                raise PipelineError(f"{where}: {stage.name} keeps every image token, so positions= does not "
                                    "apply; remove it")
            if positions not in POSITION_POLICIES:
                raise PipelineError(f"{where}: positions={positions!r} is not a position policy; give "
                                    f"{' or '.join(POSITION_POLICIES)}")
        if at is not None:
            if at not in pre:
                raise PipelineError(
                    f"{where}: at={at!r} is not a placement of {stage.name} before the LLM (valid: "
                    f"{', '.join(pre) or 'none'}); use layer=K to run it inside the LLM"
                )
            if parent.placement_layer is not None:
                raise PipelineError(
                    f"{where}: give either at={at} or layer={parent.placement_layer}, not both"
                )
        canonical = canonical_stage(parent)
        extra = {"at": at} if at is not None and at != (pre[0] if pre else None) else {}
        if positions is not None and positions != _default_positions(parent, declared, at):
            extra["positions"] = positions
        if extra:
            canonical = StageSpec(canonical.name, dict(sorted({**canonical.params, **extra}.items())))
        canonical_specs.append(canonical)
        parts = [p.bind(geometry.signals) for p in (parent.substages() or [parent])]
        for part, reducer in enumerate(parts, 1):
            if len(parts) > 1:
                where = f"stage {pos} ({stage.name}, part {part} of {len(parts)})"
            layer = reducer.placement_layer
            placement = _resolve(where, stage.name, reducer, declared, at)
            placement.check(where, reducer, layer, geometry, stages)
            _check_order(where, placement, stages)
            _check_signals(where, stage.name, reducer, placement, geometry)
            if getattr(reducer, "requires_grid", False) and grids is None:
                if not stages:  # no earlier stage: the model's (or --vision-tokens') count is no grid
                    raise PipelineError(
                        f"{where}: {stage.name} needs the token grid, but {tokens} image tokens per image "
                        "make no whole number of the model's crop grids; give --vision-tokens as a multiple "
                        "of a crop's tokens, or a reducer that needs no grid"
                    )
                fix = getattr(reducer, "grid_fix", "move it before that stage")
                raise PipelineError(
                    f"{where}: {stage.name} needs the token grid, but an earlier stage broke it; {fix}"
                )
            try:
                reducer.check_input(tokens, grids)
            except ValueError as exc:
                raise PipelineError(f"{where}: {exc}") from None
            if observed and len(stages) in observed:  # an adaptive stage, as a run saw it
                reducer = reducer.observed(observed[len(stages)])
            try:
                out = reducer.output_count(tokens, grids)
                out_grids = reducer.output_grids(grids)
            except ValueError as exc:
                raise PipelineError(f"{where}: {exc}") from None
            policy = positions or placement.default_positions(reducer)
            stages.append(
                PlannedStage(pos, reducer, canonical, placement.name, layer, tokens, out, grids, out_grids,
                             (part, len(parts)) if len(parts) > 1 else None, policy, len(stages))
            )
            tokens, grids = out, out_grids
    plan = Plan(PipelineSpec(tuple(canonical_specs)), tuple(stages), geometry)
    if observed is None:
        _check_saving(plan)
    return plan


#: the prompt length at which the compiler checks that a plan saves (``explain``'s default)
CHECK_TEXT_TOKENS = 64


def _check_saving(plan: Plan) -> None:
    """Refuse a plan with a stage that keeps every image token (ProxyV: it saves through proxies) whose
    analytic prefill costs more than the vanilla model's (at :data:`CHECK_TEXT_TOKENS` text tokens),
    unless a stage is a documented control. Reducers are bounded by their counts instead
    (:meth:`~lmmsqueeze.reducers.base.Reducer.check_input`)."""
    if not any(s.where.keeps_tokens for s in plan.stages) or any(s.reducer.is_control for s in plan.stages):
        return
    cost = plan.cost(CHECK_TEXT_TOKENS)
    if cost.saving >= 0:
        return
    blamed = ([s for s in plan.stages if s.where.keeps_tokens]
              or [s for s in plan.stages if s.tokens_out >= s.tokens_in] or list(plan.stages))
    s = blamed[0]
    what = (f"it keeps all {s.tokens_in} image tokens it receives" if s.tokens_out >= s.tokens_in
            and not s.where.keeps_tokens else "its extra work outweighs what it saves")
    raise PipelineError(
        f"stage {s.position} ({s.name}): the pipeline would cost {100 * -cost.saving:.1f}% more "
        f"prefill FLOPs than the vanilla model ({what}); {_saving_fix(s)}"
    )


def _saving_fix(stage: PlannedStage) -> str:
    """How to make a stage that costs more than it saves worth running."""
    fix = getattr(stage.reducer, "saving_fix", None)
    if fix:
        return fix(stage.tokens_in, stage.grids_in)
    return "give it a smaller budget (fewer tokens kept), or keep=1.0 to run it as a documented control"


def _declared(reducer: Reducer, where: str) -> list[Placement]:
    """The placement objects a reducer declares, in its order."""
    try:
        return [get_placement(name) for name in reducer.placements]
    except PipelineError as exc:
        raise PipelineError(f"{where}: {reducer.name} declares an unknown placement: {exc}") from None


def _resolve(where: str, name: str, reducer: Reducer, declared: list[Placement], at: str | None) -> Placement:
    """Where a stage runs: its exclusive placement if it declares one; with ``layer=K`` its layered
    placement; ``at=``; else the first placement it declares that is not layered."""
    exclusive = next((p for p in declared if p.exclusive), None)
    if exclusive is not None:
        return exclusive
    layer = reducer.placement_layer
    if layer is not None:
        layered = next((p for p in declared if p.layered), None)
        if layered is None:
            raise PipelineError(f"{where}: {name} does not run inside the LLM (placements: "
                                f"{', '.join(reducer.placements)}); remove layer={layer}")
        return layered
    if at is not None:
        return get_placement(at)
    first = next((p for p in declared if not p.layered), None)
    if first is None:
        raise PipelineError(f"{where}: {name} runs inside the LLM only; give layer=K")
    return first


def _default_positions(reducer: Reducer, declared: list[Placement], at: str | None) -> str:
    """The position policy a whole stage (before it splits into parts) takes without ``positions=``."""
    if reducer.placement_layer is not None:
        placement = next((p for p in declared if p.layered), None)
    else:
        placement = get_placement(at) if at else next((p for p in declared if p.before_llm), None)
    return placement.default_positions(reducer) if placement is not None else "renumber"


def _check_order(where: str, placement: Placement, earlier: list[PlannedStage]) -> None:
    """Stages run in placement order (and layered ones in increasing layers: their placements check)."""
    if earlier and earlier[-1].where.order > placement.order:
        order = ", ".join(p.name for p in placements())
        last = earlier[-1].where
        raise PipelineError(f"{where}: {placement.article} {placement.name} stage cannot follow "
                            f"{last.article} {last.name} stage; order stages as they run: {order} "
                            "(llm layers in increasing order)")


def _check_signals(
    where: str, name: str, reducer: Reducer, placement: Placement, geometry: ModelGeometry
) -> None:
    """A reducer reads only signals that exist at its placement and that the model provides."""
    scoped = reducer.needs - placement.signals
    for other in placements():
        unavailable = sorted(scoped & other.signals)
        if unavailable and other is not placement:
            raise PipelineError(f"{where}: {name} reads {', '.join(unavailable)}, which exists only "
                                f"{other.where}; {other.hint}")
    missing = sorted(reducer.needs - geometry.signals)
    if missing:
        raise PipelineError(f"{where}: {name} needs {', '.join(missing)}, which "
                            f"{geometry.name or 'this model'} cannot provide; pick a reducer that does not "
                            "read it")


__all__ = ["Plan", "PlannedStage", "canonical_stage", "compile_pipeline", "reduced_after_kept"]
