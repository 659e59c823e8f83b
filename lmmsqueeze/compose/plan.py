"""The compiler: a pipeline spec + a model geometry -> a validated :class:`Plan`.

Every refusal is a :class:`~lmmsqueeze.errors.PipelineError` whose one-line message names the
stage, the bad value, the valid range and the fix. No tensors are touched here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PipelineError
from ..reducers.base import LLM_SIGNALS, PLACEMENTS, POSITION_POLICIES, Grids, Reducer
from ..reducers.registry import build_reducer, reducer_params
from .flops import Cost, plan_cost
from .geometry import ModelGeometry
from .spec import PipelineSpec, StageSpec, parse_pipeline

PLACEMENT_ORDER = {p: i for i, p in enumerate(PLACEMENTS)}  # the order stages run in


@dataclass(frozen=True)
class PlannedStage:
    """One validated stage with its resolved placement and token counts."""

    position: int  # 1-based position in the pipeline
    reducer: Reducer
    spec: StageSpec  # canonical: every parameter, sorted, defaults filled
    placement: str  # vision | projector | llm
    layer: int | None  # decoder layer for llm placement
    tokens_in: int  # per image (vision/projector) or per single-image sample (llm)
    tokens_out: int
    grids_in: Grids
    grids_out: Grids
    part: tuple[int, int] | None = None  # (i, n) when a stage runs as n parts (e.g. PyramidDrop's layers)
    positions: str = "renumber"  # keep | renumber: the positions of the tokens after this stage
    index: int = 0  # 0-based index among the plan's stages

    @property
    def adaptive(self) -> bool:
        """The reducer's output count depends on the data: ``tokens_out`` is an estimate."""
        return self.reducer.adaptive

    @property
    def name(self) -> str:
        return self.spec.name

    def label(self) -> str:
        where = f"llm@{self.layer}" if self.placement == "llm" else self.placement
        part = f" part {self.part[0]}/{self.part[1]}" if self.part else ""
        return f"{self.spec.format()}{part} [{where}]"


def default_positions(reducer: Reducer, placement: str) -> str:
    """The position policy of a stage that does not give ``positions=``: the released code's (an ``llm``
    stage: the reducer's ``llm_positions``; before the LLM: renumber, as the shorter prompt is)."""
    return reducer.llm_positions if placement == "llm" else "renumber"


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

    @property
    def proxyv(self) -> PlannedStage | None:
        """The ProxyV stage, when it starts at a real layer."""
        stage = next((s for s in self.stages if s.placement == "proxyv"), None)
        return stage if stage is not None and stage.layer < self.geometry.num_layers else None

    def at(self, placement: str) -> list[PlannedStage]:
        return [s for s in self.stages if s.placement == placement]

    @property
    def llm_image_tokens(self) -> int:
        """Image tokens (per single-image sample) that enter decoder layer 0."""
        pre = [s for s in self.stages if s.placement in ("vision", "projector")]
        return pre[-1].tokens_out if pre else self.geometry.image_tokens

    def tokens_per_layer(self) -> list[int]:
        """Image tokens entering each decoder layer, for a single-image sample."""
        counts, current = [], self.llm_image_tokens
        llm = {s.layer: s for s in self.at("llm")}
        for layer in range(self.geometry.num_layers):
            if layer in llm:
                current = llm[layer].tokens_out
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
            out.append(f"{names}: {self.geometry.name or 'this model'} has no [CLS] token; cls_attention is the "
                       "mean attention each image token receives from its image's tokens in the vision tower's "
                       "last block (heads averaged, merged patches averaged)")
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
                    "positions": s.positions if s.placement != "proxyv" else None,
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


def _llm_after_proxyv(where: str, layer: int, proxyv_layer: int) -> PipelineError:
    return PipelineError(
        f"{where}: an llm reducer at layer {layer} >= {proxyv_layer} cannot run with ProxyV from layer "
        f"{proxyv_layer}, which keeps every image token there; move the reducer below layer {proxyv_layer} "
        "or start ProxyV later"
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
                        "lmmsqueeze.compile(pipeline, model_or_config) reads one from a model, config or preset")
    spec = parse_pipeline(pipeline)
    if spec.has_lists:
        raise PipelineError(
            f"pipeline {spec.format()!r} holds a list of values; lists expand into several pipelines "
            "only in `lmmsqueeze sweep`"
        )
    stages: list[PlannedStage] = []
    tokens, grids = geometry.image_tokens, geometry.grids
    last_rank, last_layer = -1, -1
    proxyv_layer: int | None = None
    canonical_specs: list[StageSpec] = []
    for pos, stage in enumerate(spec.stages, 1):
        where = f"stage {pos} ({stage.name})"
        params = dict(stage.params)
        at = params.pop("at", None)
        positions = params.pop("positions", None)
        parent = build_reducer(stage.name, params, where)
        if positions is not None:
            if "proxyv" in parent.placements:
                raise PipelineError(f"{where}: {stage.name} keeps every image token, so positions= does not "
                                    "apply; remove it")
            if positions not in POSITION_POLICIES:
                raise PipelineError(f"{where}: positions={positions!r} is not a position policy; give "
                                    f"{' or '.join(POSITION_POLICIES)}")
        if at is not None:
            before_llm = [p for p in parent.placements if p in ("vision", "projector")]
            if at not in before_llm:
                raise PipelineError(
                    f"{where}: at={at!r} is not a placement of {stage.name} before the LLM (valid: "
                    f"{', '.join(before_llm) or 'none'}); use layer=K to run it inside the LLM"
                )
            if parent.placement_layer is not None:
                raise PipelineError(f"{where}: give either at={at} or layer={parent.placement_layer}, not both")
        canonical = canonical_stage(parent)
        default_at = next((p for p in parent.placements if p in ("vision", "projector")), None)
        extra = {"at": at} if at is not None and at != default_at else {}
        parent_placement = "llm" if parent.placement_layer is not None else default_at
        if positions is not None and positions != default_positions(parent, parent_placement):
            extra["positions"] = positions
        if extra:
            canonical = StageSpec(canonical.name, dict(sorted({**canonical.params, **extra}.items())))
        canonical_specs.append(canonical)
        parts = [p.bind(geometry.signals) for p in (parent.substages() or [parent])]
        for part, reducer in enumerate(parts, 1):
            if len(parts) > 1:
                where = f"stage {pos} ({stage.name}, part {part} of {len(parts)})"
            layer = reducer.placement_layer
            if "proxyv" in reducer.placements:
                placement = "proxyv"
                if not 0 <= layer <= geometry.num_layers:
                    raise PipelineError(
                        f"{where}: layer={layer} is beyond the model: ProxyV starts at a layer in "
                        f"0..{geometry.num_layers} ({geometry.num_layers} means no ProxyV layer)"
                    )
                if proxyv_layer is not None:
                    raise PipelineError(f"{where}: a pipeline holds at most one proxyv stage")
                if last_layer >= layer:
                    raise _llm_after_proxyv(where, last_layer, layer)
                proxyv_layer = layer
            elif layer is not None:
                if proxyv_layer is not None and layer >= proxyv_layer:
                    raise _llm_after_proxyv(where, layer, proxyv_layer)
                if "llm" not in reducer.placements:
                    raise PipelineError(
                        f"{where}: {stage.name} does not run inside the LLM (placements: "
                        f"{', '.join(reducer.placements)}); remove layer={layer}"
                    )
                placement = "llm"
                if layer >= geometry.num_layers:
                    raise PipelineError(
                        f"{where}: layer={layer} is beyond the model: {geometry.name or 'it'} has "
                        f"{geometry.num_layers} decoder layers (0..{geometry.num_layers - 1})"
                    )
            elif at is not None:
                placement = at
            else:
                placement = next((p for p in reducer.placements if p != "llm"), None)
                if placement is None:
                    raise PipelineError(f"{where}: {stage.name} runs inside the LLM only; give layer=K")
            rank = PLACEMENT_ORDER[placement]
            if rank < last_rank:
                after = PLACEMENTS[last_rank]
                after = {"proxyv": "the proxyv stage", "llm": "an llm stage"}.get(after, f"a {after} stage")
                raise PipelineError(
                    f"{where}: a {placement} stage cannot follow {after}; order stages as they run: "
                    "vision, projector, llm layers in increasing order, then proxyv"
                )
            if placement == "llm":
                if layer <= last_layer:
                    raise PipelineError(
                        f"{where}: layer={layer} does not come after the previous stage's layer={last_layer}; "
                        "llm layers must strictly increase along the pipeline"
                    )
                last_layer = layer
            last_rank = rank
            inside = sorted(reducer.needs & LLM_SIGNALS)
            if inside and placement != "llm":
                raise PipelineError(
                    f"{where}: {stage.name} reads {', '.join(inside)}, which exists only inside the LLM; "
                    "give layer=K to run it at decoder layer K"
                )
            if "cls_hidden" in reducer.needs and placement != "vision":
                raise PipelineError(f"{where}: {stage.name} reads cls_hidden, which exists only at the vision "
                                    "placement; run it there (at=vision)")
            missing = sorted(reducer.needs - geometry.signals)
            if missing:
                raise PipelineError(
                    f"{where}: {stage.name} needs {', '.join(missing)}, which {geometry.name or 'this model'} "
                    "cannot provide; pick a reducer that does not read it"
                )
            if getattr(reducer, "requires_grid", False) and grids is None:
                fix = getattr(reducer, "grid_fix", "move it before that stage")
                raise PipelineError(f"{where}: {stage.name} needs the token grid, but an earlier stage broke it; {fix}")
            keep = getattr(reducer, "keep", None)
            if isinstance(keep, int) and keep > tokens:
                raise PipelineError(
                    f"{where}: keep={keep} is more than the {tokens} image tokens this stage receives; "
                    f"give keep <= {tokens} or a fraction in (0, 1]"
                )
            if observed and len(stages) in observed:  # an adaptive stage, as a run saw it
                reducer = reducer.observed(observed[len(stages)])
            try:
                out = reducer.output_count(tokens, grids)
                out_grids = reducer.output_grids(grids)
            except ValueError as exc:
                raise PipelineError(f"{where}: {exc}") from None
            policy = positions or default_positions(reducer, placement)
            stages.append(
                PlannedStage(pos, reducer, canonical, placement, layer, tokens, out, grids, out_grids,
                             (part, len(parts)) if len(parts) > 1 else None, policy, len(stages))
            )
            tokens, grids = out, out_grids
    canonical = PipelineSpec(tuple(canonical_specs))
    return Plan(canonical, tuple(stages), geometry)


__all__ = ["Plan", "PlannedStage", "canonical_stage", "compile_pipeline", "default_positions"]
