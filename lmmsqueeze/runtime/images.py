"""Each image before the LLM: its tokens and vision signals as the projector sees them, and the stages
that run there.

Installed for every non-vanilla plan (the prefill reads each image's record from it):

* forward hooks on the vision tower measure the vision signals the plan reads;
* a pre-hook on the projector records each image (and runs the stages placed at its input), a forward
  hook runs the stages placed at its output; for families that pack features after the projector
  (LLaVA-NeXT: base crop, unpadded sub-crop grid, newline tokens; Qwen2-VL: all images' merged
  patches in one tensor) both run on each image's packed features instead, through the family's
  :meth:`~lmmsqueeze.models.base.Family.hook_packed_features`; separator (newline) placeholders are
  never image tokens for any stage: they stay in the prompt like text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..compose.plan import PlannedStage
from ..errors import ModelError
from ..reducers.base import VISION_SIGNALS, Signals, TokenState
from .hooks import HookSet
from .records import ImageRecord, rows_of


class ImageStages:
    """The images of the current call, from the vision tower to the LLM's input.

    ``input_stages`` run on the projector's input (vision features), ``output_stages`` on its output;
    the placements that own them fill these lists when they install.
    """

    def __init__(self, run: Any):
        self.run = run
        self.family = run.family
        self.records: list[ImageRecord] = []
        self.input_stages: list[PlannedStage] = []
        self.output_stages: list[PlannedStage] = []
        self._vision: dict[str, Tensor] = {}
        self._crop_inputs: Tensor | None = None  # projector inputs of every crop (packing families)
        plan = run.plan
        reads: set[str] = set()
        for s in plan.stages:
            reads |= s.reducer.needs | (s.reducer.optional & plan.geometry.signals)
        self._needs = reads & VISION_SIGNALS

    def install(self, hooks: HookSet) -> None:
        f = self.family
        if self._needs:
            for module, probe in f.vision_probes(self._needs):
                hooks.post(module, self._probe_hook(probe))
        hooks.pre(f.projector, self._projector_pre)
        if f.packs_features:
            f.hook_packed_features(hooks, self._packed_features)
        else:
            hooks.post(f.projector, self._projector_post)

    def take(self) -> list[ImageRecord]:
        """The records of the images the last encoding saw (each call's encoding starts them afresh),
        forgetting them: a prefill consumes them once."""
        if not self.records:
            raise ModelError("image features were computed outside this pipeline's hooks; pass pixel_values "
                             "(or encode images inside the `apply` block)")
        images, self.records = self.records, []
        return images

    # -- hooks
    def _probe_hook(self, probe: Any) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._vision.update(probe(module, args, kwargs, output))

        return hook

    def _signals_of(self, i: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Image ``i``'s vision signals (non-packing families): rows of its tokens, and per-image ones."""
        rows = {k: self.family.signal_rows(v)[i] for k, v in self._vision.items() if k != "cls_hidden"}
        extras = {k: v[i] for k, v in self._vision.items() if k == "cls_hidden"}
        return rows, extras

    def _projector_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        feats = args[0] if args else kwargs["image_features"]
        if self.family.packs_features:
            # the records are made from the packed features (a video's frames pass the projector too,
            # after its prompt's images: they must not wipe the images' records)
            self._crop_inputs = feats
            return None
        self.records = []
        geometry = self.run.plan.geometry
        for i in range(feats.shape[0]):
            grid = geometry.grids if geometry.grids and feats.shape[1] == geometry.image_tokens else None
            rows, extras = self._signals_of(i)
            self.records.append(ImageRecord.of(TokenState.initial(feats[i], grid), rows, extras,
                                               self.run.rows))
        if not self.input_stages:
            return None
        self._run_stages(self.input_stages)
        out = self._joined()
        return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "image_features": out})

    def _projector_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        pieces = output.reshape(-1, output.shape[-1]).split([rec.state.n for rec in self.records])
        for rec, hidden in zip(self.records, pieces, strict=True):
            rec.state = rec.state.with_hidden(hidden)
        if self.output_stages:
            self._run_stages(self.output_stages)
        return self._joined()

    def _packed_features(self, packed: list[Tensor], layouts: list[Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The stages on packed images (LLaVA-NeXT, Qwen2-VL): each image is one state whose crops are
        the layout's grids; separators (newlines) are taken out before the stages and put back after
        them, each after the surviving tokens that preceded it. Returns the new features and each
        image's groups (the output token of every original token)."""
        f = self.family
        rows_in = None if self._crop_inputs is None else f.projector_rows(self._crop_inputs)
        total = sum(lay.crops for lay in layouts)
        if rows_in is None or rows_in.shape[0] != total:
            raise ModelError(f"the projector saw {0 if rows_in is None else rows_in.shape[0]} crops, but the "
                             f"images' sizes give {total}; compute image features inside the `apply` block")
        signals = {name: f.signal_rows(value) for name, value in self._vision.items() if name != "cls_hidden"}
        self.records, start = [], 0
        for run, lay in zip(packed, layouts, strict=True):
            sep = lay.separators.to(run.device)
            if self.input_stages and lay.mixed:
                names = ", ".join(s.name for s in self.input_stages)
                raise ModelError(f"{type(f.model).__name__} blends this image's tokens after the projector "
                                 f"(its sub-crop grid is downsampled), so a vision-placement stage ({names}) "
                                 "cannot pick them; use a stage at the projector or inside the LLM for such "
                                 "images")
            vision = {name: f.gather_rows(value[start:start + lay.crops], lay)
                      for name, value in signals.items()}
            extras = {k: v[start:start + lay.crops, 0] for k, v in self._vision.items() if k == "cls_hidden"}
            hidden = f.gather_rows(rows_in[start:start + lay.crops], lay) if self.input_stages else run[~sep]
            state = TokenState.initial(hidden, lay.grids, lay.crop_ids.to(run.device))
            self.records.append(ImageRecord.of(state, vision, extras, self.run.rows,
                                               sep if bool(sep.any()) else None, run[sep],
                                               crops=len(lay.grids)))
            start += lay.crops
        if self.input_stages:
            self._run_stages(self.input_stages)
            for rec in self.records:  # per token; bypasses this run's own projector hook
                rec.state = rec.state.with_hidden(f.project(rec.state.hidden))
        if self.output_stages:
            self._run_stages(self.output_stages)
        return ([self._with_separators(rec) for rec in self.records],
                [rec.state.assign for rec in self.records])

    @staticmethod
    def _with_separators(rec: ImageRecord) -> Tensor:
        marks = rec.layout()
        if marks is None:
            return rec.state.hidden
        values = rec.separator_values
        row = values.new_empty(marks.numel(), values.shape[-1])
        row[marks] = values
        row[~marks] = rec.state.hidden.to(values.dtype)
        return row

    def _run_stages(self, stages: list[PlannedStage]) -> None:
        for rec in self.records:
            for stage in stages:
                signals = Signals()
                for name in stage.reducer.needs | stage.reducer.optional:
                    if name in rec.extras:
                        setattr(signals, name, rec.extras[name])
                    elif name in rec.vision:
                        setattr(signals, name, rows_of(rec.vision[name], rec.state.index))
                rec.apply(checked_reduce(stage, rec.state, signals), stage.positions)

    def _joined(self) -> Tensor:
        """The images' tokens for the next module: ``[images, n, D]`` when every image kept as many,
        else all of them in one row ``[1, total, D]`` (the projector works token by token)."""
        states = [rec.state.hidden for rec in self.records]
        if len({s.shape[0] for s in states}) <= 1:
            return torch.stack(states)
        return torch.cat(states)[None]


def checked_reduce(stage: PlannedStage, state: TokenState, signals: Signals) -> TokenState:
    """A stage's reduction, held to the count its reducer promised (adaptive stages excepted)."""
    new = stage.reducer.reduce(state, signals)
    expected = stage.reducer.output_count(state.n, state.grids)
    if new.n != expected and not stage.adaptive:
        raise ModelError(f"{stage.name} returned {new.n} tokens, but its output_count promises {expected}")
    return new
