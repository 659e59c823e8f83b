"""Placements: where in a model a stage runs, one registered object each.

A :class:`Placement` knows its order among the others, how the compiler resolves and checks a stage
there, what a stage there costs, and (on the runtime side) how it installs. The compiler, the cost
model and the runtime loop over placement objects; none switches on a placement's name. The
built-in ones live in :mod:`lmmsqueeze.runtime.placements` (``vision``, ``projector``, ``llm``) and
:mod:`lmmsqueeze.proxyv.placement` (``proxyv``); a new placement is one file that subclasses
:class:`Placement` and calls :func:`register_placement`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..builtins import load_builtins
from ..errors import PipelineError, RegistryError
from ..reducers.base import Grids, Reducer
from .flops import CostContext, LayerCost, metric_width
from .geometry import ModelGeometry
from .spec import StageSpec


class Placement:
    """One place a stage can run. Subclasses set the class attributes and override what differs.

    Attributes:
        name: the placement's name in reducers' ``placements`` and in plans.
        order: stages run in increasing order of their placements (then of their layers).
        before_llm: a stage here sees each image before the LLM (chosen with ``at=``).
        layered: a stage here sits at a decoder layer (its reducer's ``layer``).
        exclusive: a reducer that declares this placement runs only here.
        keeps_tokens: a stage here keeps every image token (no ``positions=`` policy).
        takes_weights: a stage here runs with trained weights (an adapter; see :meth:`prepare_weights`).
        signals: the signals a reducer can read here (the model must provide them too).
        where: a phrase for messages ("inside the LLM") and ``hint``: how to run a stage here.
        title: how messages name a stage here (default: the placement's name); ``article`` its article.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0
    before_llm: ClassVar[bool] = False
    layered: ClassVar[bool] = False
    exclusive: ClassVar[bool] = False
    keeps_tokens: ClassVar[bool] = False
    takes_weights: ClassVar[bool] = False
    signals: ClassVar[frozenset[str]] = frozenset()
    title: ClassVar[str] = ""
    article: ClassVar[str] = "a"  # "an llm stage"
    where: ClassVar[str] = ""
    hint: ClassVar[str] = ""

    # -- the compiler
    def titled(self) -> str:
        return self.title or self.name

    def label(self, layer: int | None) -> str:
        """How a plan prints a stage's placement."""
        return self.name

    def default_positions(self, reducer: Reducer) -> str:
        """The position policy of a stage here without ``positions=`` (see ``Reducer.llm_positions``)."""
        return "renumber"

    def check(self, where: str, reducer: Reducer, layer: int | None, geometry: ModelGeometry,
              earlier: Sequence[PlannedStage]) -> None:
        """Refuse (:class:`PipelineError`) what this placement cannot run, given the stages before."""

    # -- the cost model
    def feature_width(self, g: ModelGeometry) -> int:
        """Width of the hidden states a reducer here multiplies."""
        return g.hidden_size

    def overhead(self, stage: PlannedStage, g: ModelGeometry, ctx: CostContext) -> dict[int | None, int]:
        """MACs a stage adds, keyed by the decoder layer they are counted at (None: before the LLM):
        by default its reducer's own work on every image."""
        width = metric_width(g, stage.reducer, self.feature_width(g))
        return {None: ctx.images * stage.reducer.cost_macs(stage.tokens_in, width, stage.grids_in)}

    def layer_cost(
        self, stage: PlannedStage, g: ModelGeometry, layer: int, ctx: CostContext
    ) -> LayerCost | None:
        """The cost of decoder layer ``layer`` when this stage changes how it runs, else None."""
        return None

    # -- the runtime
    def prepare_weights(self, model: Any, plan: Any, weights: Any) -> Any:
        """Trained weights this placement's stages run with (None: they need none)."""
        return None

    def pipeline_of(self, weights: Any) -> str | None:
        """The pipeline that trained ``weights`` were made for, when they are this placement's."""
        return None

    def install(self, run: Any, hooks: Any, stages: list[PlannedStage]) -> None:
        """Install this placement's ``stages`` on ``run``'s model through ``hooks`` (a ``HookSet``)."""
        raise NotImplementedError(f"placement {self.name!r} has no runtime")

    def final_trace(self) -> bool:
        """Whether a stage here is traced by the tokens' state when the prefill ends (it keeps them all)."""
        return self.keeps_tokens


_PLACEMENTS: dict[str, Placement] = {}


def register_placement(placement: Placement) -> Placement:
    """Register a placement object under its ``name``; a name registered twice is refused."""
    name = placement.name
    if not name or not name.isidentifier():
        raise RegistryError(f"placement name {name!r} must be an identifier, e.g. 'projector'")
    if name in _PLACEMENTS and type(_PLACEMENTS[name]) is not type(placement):
        raise RegistryError(f"placement {name!r} is registered already ({type(_PLACEMENTS[name]).__name__}); "
                            "pick another name")
    _PLACEMENTS[name] = placement
    return placement


def get_placement(name: str) -> Placement:
    load_builtins()
    try:
        return _PLACEMENTS[name]
    except KeyError:
        raise PipelineError(
            f"placement {name!r} is not registered; placements: {', '.join(placement_names())}"
        ) from None


def placements() -> list[Placement]:
    """Every registered placement, in run order."""
    load_builtins()
    return sorted(_PLACEMENTS.values(), key=lambda p: p.order)


def placement_names() -> list[str]:
    return [p.name for p in placements()]


@dataclass(frozen=True)
class PlannedStage:
    """One validated stage with its resolved placement and token counts."""

    position: int  # 1-based position in the pipeline
    reducer: Reducer
    spec: StageSpec  # canonical: every parameter, sorted, defaults filled
    placement: str  # the name of its placement (vision | projector | llm | proxyv | ...)
    layer: int | None  # decoder layer of a layered placement (llm, proxyv)
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

    @property
    def where(self) -> Placement:
        """The placement object this stage runs at."""
        return get_placement(self.placement)

    def label(self) -> str:
        where = self.where.label(self.layer)
        part = f" part {self.part[0]}/{self.part[1]}" if self.part else ""
        return f"{self.spec.format()}{part} [{where}]"
