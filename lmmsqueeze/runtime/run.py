"""A plan installed on a model: :func:`prepare` once, then :meth:`Prepared.apply` around calls.

All intervention happens through module hooks installed by one :class:`~.hooks.HookSet` and removed
when the ``with`` block ends:

* the prefill rewrite (:mod:`.prefill`), a pre-hook on the multimodal base model;
* each image before the LLM (:mod:`.images`): vision probes and the projector's hooks;
* each placement's own hooks (:mod:`.placements`, and any registered placement such as ProxyV's),
  installed in reverse run order so that a placement which replaces decoder layers does so before
  earlier ones hook them.

A stage's output order is the order its tokens take in the sequence, and its ``positions`` policy
(:mod:`.positions`) says which positions they take; decode steps continue each layer's numbering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..compose.placements import placements
from ..compose.plan import Plan, PlannedStage, compile_pipeline
from ..compose.spec import PipelineSpec
from ..errors import ModelError
from ..models import Family, family_for
from .costs import InputCosts
from .hooks import HookSet, HookTimer
from .images import ImageStages
from .prefill import PrefillHook
from .records import Prefill


class PipelineRun:
    """A plan installed on a model. Yielded by :meth:`Prepared.apply`; read it after a forward or generate.

    Attributes:
        plan: the compiled plan being executed.
        family: the model's family view (:class:`~lmmsqueeze.models.Family`).
        weights: trained weights the plan's stages run with (e.g. a ProxyV adapter), or None.
        prefill: what the last prefill recorded (:class:`~.records.Prefill`), None before one.
        scratch: per-prefill state of placements (emptied at every prefill).
        image_tokens_per_layer: image tokens of the first sample entering each decoder layer.
    """

    def __init__(self, model: nn.Module, plan: Plan, family: Family, weights: Any = None):
        self.model = model
        self.plan = plan
        self.family = family
        self.weights = weights
        self.prefill: Prefill | None = None
        self.scratch: dict[str, Any] = {}
        self.trace_entries: list[list[Tensor]] = []
        self.group_entries: list[list[Tensor]] = []
        self.kept: list[list[int]] = []  # per image of the last prefill: tokens after each pre-LLM stage
        self.image_tokens_per_layer: list[int] = []
        self.rows = 3 if family.mrope else 1  # position rows: 3 for M-RoPE
        backend = getattr(model.config.get_text_config(), "_attn_implementation", None) or ""
        self.flat_masks = "flash" in str(backend)  # flash-attn layers take 2-D padding masks only
        self.images = ImageStages(self)
        self.timer: HookTimer | None = None  # set by Prepared.apply when the hooks' time is measured

    def model_work(self) -> contextlib.AbstractContextManager:
        """Around model computation a hook runs on the model's behalf: not the pipeline's overhead."""
        return self.timer.model_work() if self.timer is not None else contextlib.nullcontext()

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of work done inside :meth:`model_work` as the pipeline's overhead after all."""
        if self.timer is not None:
            self.timer.seconds += seconds

    @property
    def trace(self) -> list[list[Tensor]]:
        """``trace[stage][sample]``: after a prefill, the original indices (``0..N-1`` over the sample's
        image tokens) of the tokens that survive that stage, in the order they sit in the sequence;
        for merged tokens, the index of each group's representative; -1 for a token made from no
        single one (VisionZip's [CLS] feature). Separator placeholders (LLaVA-NeXT's newline tokens)
        are not image tokens: they are never counted or dropped."""
        return self._entries(self.trace_entries, "index")

    @property
    def groups(self) -> list[list[Tensor]]:
        """``groups[stage][sample]``: ``[N]``, the output token (its place in ``trace[stage][sample]``)
        each original image token belongs to after that stage (-1 if dropped)."""
        return self._entries(self.group_entries, "assign")

    def _entries(self, entries: list[list[Tensor]], field_name: str) -> list[list[Tensor]]:
        """A stage whose placement keeps every token is traced by the tokens' state when the prefill ended."""
        if self.prefill is None:
            return entries
        final = [getattr(s.meta, field_name) for s in self.prefill.samples]
        return [final if s.where.final_trace() else e for s, e in zip(self.plan.stages, entries, strict=True)]

    @property
    def output_positions(self) -> Tensor | None:
        """``[B, L_out]``: for each row of the last prefill's logits, the column of the caller's
        ``input_ids`` it belongs to (-1 for padding the runtime added)."""
        p = self.prefill
        if p is None:
            return None
        if not p.segments:
            return p.source_columns
        last = p.segments[-1]
        rows = p.source_columns.gather(1, last.keep)
        return rows if last.alive is None else rows.masked_fill(~last.alive, -1)

    def observed_counts(self) -> list[list[int]]:
        """Per image of the last prefill, in prompt order: the tokens each stage kept (pre-LLM stages
        per image, later stages for the image's sample); what adaptive stages cost is read from it."""
        return self.kept

    def install(self, hooks: HookSet) -> None:
        if self.plan.is_vanilla:
            return
        hooks.pre(self.family.base, PrefillHook(self))
        self.images.install(hooks)
        self.family.install(self, hooks)
        for placement in reversed(placements()):
            stages = self.plan.at(placement.name)
            if stages:
                placement.install(self, hooks, stages)

    def record(self, stage: PlannedStage, index: Tensor, assign: Tensor) -> None:
        """Trace one sample's tokens after a decoder-side stage."""
        self.trace_entries[stage.index].append(index)
        self.group_entries[stage.index].append(assign)


@dataclass
class Prepared:
    """A pipeline compiled for one loaded model, with the trained weights its stages need: the one
    object every caller (CLI, runner, lmms-eval bridge, bench, training) runs a pipeline through."""

    model: nn.Module
    plan: Plan
    family: Family
    weights: Any = None

    @contextlib.contextmanager
    def apply(self, timer: HookTimer | None = None) -> Iterator[PipelineRun]:
        """Install the plan for the duration of a ``with`` block; every hook is removed on exit.
        ``timer`` adds up the time spent in the run's hooks (what the pipeline costs beyond the layers)."""
        run = PipelineRun(self.model, self.plan, self.family, self.weights)
        run.timer = timer
        with HookSet(timer) as hooks:
            run.install(hooks)
            yield run

    def costs(self) -> InputCosts:
        """An accumulator of the analytic costs of the images runs see (their own sizes and counts)."""
        return InputCosts(self.plan, self.family)


def prepare(
    model: nn.Module, pipeline: str | PipelineSpec | Plan | None = None, weights: Any = None
) -> Prepared:
    """Compile ``pipeline`` for a loaded model and resolve the trained weights its stages need.

    Args:
        model: a supported transformers model (see :func:`lmmsqueeze.models.supported_models`).
        pipeline: pipeline text, a spec, or a compiled plan; None or ``""`` is the vanilla model, or,
            with ``weights``, the pipeline the weights were trained for.
        weights: trained weights (e.g. a ProxyV adapter, its directory or ``bundled:<name>``), for a
            placement that runs with them; a stage that needs weights and gets none is freshly
            initialised (seed 0).
    """
    if weights is not None and (pipeline is None or pipeline in ("", "none")):
        pipeline = next((p for w in placements() if (p := w.pipeline_of(weights)) is not None), pipeline)
    family = family_for(model)
    plan = pipeline if isinstance(pipeline, Plan) else compile_pipeline(pipeline, family.geometry)
    takers = [p for p in placements() if p.takes_weights]
    if weights is not None and not any(plan.at(p.name) for p in takers):
        raise ModelError(f"an adapter was given, but pipeline {plan.canonical!r} has no "
                         f"{' or '.join(p.name for p in takers)} stage; add one, or omit the pipeline to "
                         "use the adapter's own")
    resolved = [r for p in takers if (r := p.prepare_weights(model, plan, weights)) is not None]
    return Prepared(model, plan, family, resolved[0] if resolved else None)


@contextlib.contextmanager
def apply(
    model: nn.Module, pipeline: str | PipelineSpec | Plan | None, weights: Any = None
) -> Iterator[PipelineRun]:
    """Install a pipeline on a transformers model for the duration of a ``with`` block:
    ``prepare(model, pipeline, weights).apply()``.

    Example::

        with lmmsqueeze.apply(model, "pool | fastv(layer=2, keep=0.5)") as run:
            out = model.generate(**inputs, max_new_tokens=8)
        run.trace  # surviving original indices, per stage and sample
    """
    with prepare(model, pipeline, weights).apply() as run:
        yield run
