"""The ``llm`` placement: a reducer at the input of decoder layer K, scored with signals of layer K-1.

Pre-hooks on decoder layers >= K run the stage at layer K and slice hidden states, RoPE cos/sin,
position ids and the attention mask for every later layer (prefill) or the mask's key columns
(decode), so each layer's KV cache holds exactly the tokens that reached it; forward hooks on the
attention of layer K-1 measure the one-query signals the stage reads (:mod:`lmmsqueeze.attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...compose.flops import CostContext, probe_macs
from ...compose.geometry import ModelGeometry
from ...compose.placements import Placement, register_placement
from ...compose.plan import PlannedStage, reduced_after_kept
from ...errors import PipelineError
from ...reducers.base import LLM_SIGNALS, VISION_SIGNALS, Reducer
from ..hooks import HookSet
from ..llm_signals import ReusedProjection, cached_keys, previous_layer_signals, reuses_keys, text_relevance
from ..llm_stage import run_llm_stage, segment_rope, text_columns
from ..masks import mask_filler, slice_key_columns, slice_square_mask
from ..positions import shift_rope
from ..records import Segment

#: signals a stage reads from the decoder layer before it
PROBED = frozenset({"text_attention", "text_image_attention", "llm_keys", "text_keys"})


class LlmPlacement(Placement):
    """``layer=K``: at the input of decoder layer K (0-indexed)."""

    name: ClassVar[str] = "llm"
    order: ClassVar[int] = 2
    layered: ClassVar[bool] = True
    signals: ClassVar[frozenset[str]] = LLM_SIGNALS | (VISION_SIGNALS - {"cls_hidden"})
    where: ClassVar[str] = "inside the LLM"
    hint: ClassVar[str] = "give layer=K to run it at decoder layer K"
    article: ClassVar[str] = "an"

    def label(self, layer: int | None) -> str:
        return f"llm@{layer}"

    def default_positions(self, reducer: Reducer) -> str:
        return reducer.llm_positions

    def check(self, where: str, reducer: Reducer, layer: int | None, geometry: ModelGeometry,
              earlier: Sequence[PlannedStage]) -> None:
        keeper = next((s for s in earlier if s.where.layered and s.where.keeps_tokens), None)
        if keeper is not None and layer >= keeper.layer:
            raise reduced_after_kept(where, layer, keeper.where.titled(), keeper.layer)
        if layer >= geometry.num_layers:
            raise PipelineError(
                f"{where}: layer={layer} is beyond the model: {geometry.name or 'it'} has "
                f"{geometry.num_layers} decoder layers (0..{geometry.num_layers - 1})"
            )
        last = max((s.layer for s in earlier if s.placement == self.name), default=-1)
        if layer <= last:
            raise PipelineError(f"{where}: layer={layer} does not come after the previous stage's "
                                f"layer={last}; llm layers must strictly increase along the pipeline")

    def overhead(self, stage: PlannedStage, g: ModelGeometry, ctx: CostContext) -> dict[int | None, int]:
        """The stage's probes at layer K-1 and its reducer's work, counted at layer K."""
        n_at_probe = ctx.text_tokens + ctx.tokens_per_layer[stage.layer - 1] if stage.layer > 0 else 0
        macs = probe_macs(g, stage.reducer.needs, n_at_probe, ctx.text_after_image)
        if reuses_keys(stage.reducer):
            # layer K reuses the keys the probe projected for the rows a pruning stage keeps
            kept = ctx.text_tokens + ctx.tokens_per_layer[stage.layer]
            macs -= kept * g.hidden_size * g.num_kv_heads * g.head_dim
        macs += super().overhead(stage, g, ctx)[None]
        return {stage.layer: macs}

    def install(self, run: Any, hooks: HookSet, stages: list[PlannedStage]) -> None:
        LlmHooks(run, stages).install(hooks)


class LlmHooks:
    """The decoder-side hooks of one run's ``llm`` stages."""

    def __init__(self, run: Any, stages: list[PlannedStage]):
        self.run = run
        self.stages = stages
        self.reused: dict[int, ReusedProjection] = {}  # layer K -> its k_proj stand-in

    def install(self, hooks: HookSet) -> None:
        layers = self.run.family.layers
        if any("text_relevance" in s.reducer.needs for s in self.stages):
            hooks.pre(layers[0], self._relevance_hook)
        if not self.stages:
            return
        for i in range(self.stages[0].layer, len(layers)):
            hooks.pre(layers[i], self._make_layer_hook(i))
        for stage in self.stages:
            if reuses_keys(stage.reducer):
                # layer K takes the keys the stage projected to score it
                proj = layers[stage.layer].self_attn.k_proj
                self.reused[stage.layer] = ReusedProjection(proj.forward)
                hooks.patch(proj, "forward", self.reused[stage.layer])
            needs = stage.reducer.needs & PROBED
            if needs:
                hooks.post(layers[stage.layer - 1].self_attn, self._make_llm_probe(stage, frozenset(needs)))

    def _relevance_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the decoder input: each sample's text relevance (a prefill with images only)."""
        p = self.run.prefill
        if p is None or p.decoding:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        p.relevance = []
        for b, sample in enumerate(p.samples):
            text = text_columns(sample, p.padding[b])
            p.relevance.append(text_relevance(hidden[b, sample.slots], hidden[b, text]))

    def _make_llm_probe(self, stage: PlannedStage, needs: frozenset[str]):
        def probe(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            p = self.run.prefill
            if p is None or p.decoding:
                return
            hidden = kwargs["hidden_states"]
            rope = tuple(t.expand(hidden.shape[0], -1, -1) for t in kwargs["position_embeddings"])
            pad = p.current_padding(stage.layer - 1)
            text = [text_columns(s, pad[b]) for b, s in enumerate(p.samples)]
            # the layer's own post-RoPE keys, as it just wrote them to the cache (no second projection)
            index = getattr(module, "layer_idx", stage.layer - 1)
            keys = cached_keys(kwargs.get("cache"), index, hidden.shape[1])
            p.llm_signals[stage.layer] = previous_layer_signals(module, hidden, rope, pad, text, needs, keys)

        return probe

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            p = self.run.prefill
            if p is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if not p.decoding:
                stage = next((s for s in self.stages if s.layer == layer), None)
                if stage is not None:
                    hidden = self._llm_stage(stage, hidden, module, kwargs)
                seg = p.segment_for(layer)
                if seg is None:
                    return None
                if seg.position_embeddings is None:
                    seg.position_embeddings = segment_rope(self.run.family, hidden, seg)
                source = kwargs.get("attention_mask")
                mask = seg.sliced_mask(False, source, hidden.shape[1], lambda: mask_filler(
                    slice_square_mask(source, seg.keep), seg.alive, square=True, flat=self.run.flat_masks))
                new = {**kwargs, "attention_mask": mask, "position_embeddings": seg.position_embeddings,
                       "position_ids": seg.position_ids}
            else:
                seg = p.segment_for(layer)
                if seg is None:
                    return None
                source = kwargs.get("attention_mask")
                cache = kwargs.get("cache")
                # keys of this layer: kept prefill + later
                total = cache.get_seq_length(layer) + hidden.shape[1]
                new = {**kwargs, "attention_mask": seg.sliced_mask(
                    True, source, total, lambda: self._decode_mask(seg, source, total, hidden.shape[1]))}
                if bool((seg.delta != 0).any()):
                    rope = kwargs["position_embeddings"]
                    new["position_embeddings"] = seg.shifted_rope(rope, lambda: self._shift(rope, seg.delta))
            if args:
                return (hidden, *args[1:]), new
            return args, {**new, "hidden_states": hidden}

        return hook

    def _llm_stage(self, stage: PlannedStage, hidden: Tensor, layer: nn.Module, kwargs: dict) -> Tensor:
        p = self.run.prefill
        prev = p.segment_for(stage.layer - 1)
        if p.ids is None:  # the first llm stage: the prefill's own positions
            pos = kwargs.get("position_ids")
            pos = torch.arange(hidden.shape[1], device=hidden.device)[None] if pos is None else pos
            p.ids = p.mrope if p.mrope is not None else pos.expand(hidden.shape[0], -1)[None]
        rope = prev.position_embeddings if prev is not None else kwargs["position_embeddings"]
        seg, rows, keys = run_llm_stage(self.run, stage, hidden, layer, rope, prev)
        if keys is not None and stage.layer in self.reused:
            self.reused[stage.layer].pending = keys
        p.segments.append(seg)
        count = int(p.samples[0].slots.numel())
        for i in range(stage.layer, len(self.run.image_tokens_per_layer)):
            self.run.image_tokens_per_layer[i] = count
        return rows

    def _shift(self, rope: tuple[Tensor, Tensor], delta: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = (t.expand(delta.shape[0], -1, -1) for t in rope)
        return shift_rope(cos, sin, self.run.family.rotary, delta.to(cos.device), self.run.family.mrope)

    def _decode_mask(self, seg: Segment, mask: Any, total: int, queries: int) -> Any:
        """A decode step's mask over the segment's kept prefill columns and every later column."""
        mask = slice_key_columns(mask, seg.keep, self.run.prefill.length)
        if seg.alive is None:
            return mask
        tail = torch.ones(seg.alive.shape[0], total - seg.alive.shape[1], dtype=torch.bool,
                          device=seg.alive.device)
        return mask_filler(mask, torch.cat([seg.alive, tail], 1), square=False, queries=queries,
                           flat=self.run.flat_masks)


register_placement(LlmPlacement())
