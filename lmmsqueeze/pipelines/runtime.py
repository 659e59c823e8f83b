"""The prefill runtime: executes a compiled :class:`~lmmsqueeze.compose.Plan` on a transformers model.

All intervention happens through module hooks installed by one :class:`~.hooks.HookSet`:

* a pre-hook on the multimodal base model detects a prefill with images, encodes the images
  (running ``vision``/``projector`` stages inside the projector hooks), rewrites each image's
  placeholder run to its reduced length and, on later decode steps, keeps the attention mask and
  position ids consistent with the shorter prompt;
* a pre-hook on the projector runs ``vision`` stages, a forward hook runs ``projector`` stages;
  for families that pack features after the projector (LLaVA-NeXT: base crop, unpadded sub-crop
  grid, newline tokens; Qwen2-VL: all images' merged patches in one tensor) both run on each
  image's packed features instead, through the adapter's
  :meth:`~.adapters.ModelAdapter.hook_packed_features`; separator (newline) placeholders are
  never image tokens for any stage: they stay in the prompt like text;
* pre-hooks on decoder layers >= K run ``llm`` stages at layer K and slice hidden states, RoPE
  cos/sin, position ids and the attention mask for every later layer (prefill) or the mask's key
  columns (decode), so each layer's KV cache holds exactly the tokens that reached it;
* forward hooks on attention modules measure one-query signals (see :mod:`.probes`).

Positions: a ``projector`` reduction renumbers the prompt (the placeholder run is shorter), except
on M-RoPE families (Qwen2-VL), where every survivor keeps its original 3-D ids and only the text
row that orders the sequence is renumbered; an ``llm`` reduction keeps every survivor's original
position (RoPE stays consistent).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..compose.plan import Plan, PlannedStage, compile_pipeline
from ..compose.spec import PipelineSpec
from ..errors import ModelError
from ..reducers.base import LLM_SIGNALS, VISION_SIGNALS, Signals, TokenState
from .adapters import ModelAdapter, adapter_for
from .hooks import HookSet
from .probes import last_query_attention, rows_attention


@dataclass
class _ImageRecord:
    """One image's tokens through the pre-LLM stages."""

    state: TokenState
    vision: dict[str, Tensor]  # vision signals, first dim aligned with the original features
    history: list[TokenState] = field(default_factory=list)  # the state after each pre-LLM stage
    crops: int = 1  # crops of the image (crop ids of its tokens are 0..crops-1)
    separators: Tensor | None = None  # [run] True at separator placeholders (newlines) of the output run
    separator_values: Tensor | None = None  # [k, D] the separators' features

    @property
    def run_in(self) -> int:
        """Placeholders of the image in the prompt as the processor built it."""
        return self.state.n_original + (0 if self.separators is None else int(self.separators.sum()))

    @property
    def run_out(self) -> int:
        """Placeholders of the image after the pre-LLM stages."""
        return self.state.n + (0 if self.separators is None else int(self.separators.sum()))


@dataclass
class _Sample:
    """One sample's image tokens inside the decoder (hidden states live in the sequence)."""

    slots: Tensor  # [n] position of each current image token in the current sequence
    meta: TokenState  # index/sizes/crops/grids/assign of the current tokens (hidden is a placeholder)
    vision: dict[str, Tensor]  # vision signals over the sample's original image tokens


@dataclass
class _Segment:
    """Layers from an llm stage's layer to the next: which prefill columns they hold."""

    stage: PlannedStage
    keep: Tensor  # [B, n] columns of the prefill sequence kept from this layer on
    alive: Tensor | None = None  # [B, n] False at filler columns (masked everywhere), None: all real
    position_embeddings: tuple[Tensor, Tensor] | None = None
    position_ids: Tensor | None = None
    # The model hands every layer of a forward the same mask object (one per layer type), so a segment
    # slices each one once: (decoding, the model's mask, key length, the sliced mask) of this forward.
    masks: list[tuple[bool, Any, int, Any]] = field(default_factory=list)

    def sliced_mask(self, decoding: bool, source: Any, length: int, make: Any) -> Any:
        for phase, seen, n, sliced in self.masks:
            if phase == decoding and seen is source and n == length:
                return sliced
        sliced = make()
        self.masks = [m for m in self.masks if m[0] == decoding and m[2] == length] + [
            (decoding, source, length, sliced)]
        return sliced


@dataclass
class _Prefill:
    """State of the current generation: set at prefill, read by every later decode step."""

    batch: int
    length: int  # prefill length after any placeholder rewrite
    padding: Tensor  # [B, length] True for real tokens
    source_columns: Tensor  # [B, length] input column of every prefill column (-1: added padding)
    rewritten: bool
    new_mask: Tensor | None  # [B, length] the prompt's 2-D mask after the rewrite
    input_length: int  # prompt length as the caller sees it
    removed: Tensor  # [B] prompt tokens removed by the rewrite
    samples: list[_Sample]
    segments: list[_Segment] = field(default_factory=list)
    llm_signals: dict[int, dict[str, Any]] = field(default_factory=dict)  # stage layer K -> probes at K-1
    mrope: Tensor | None = None  # [3, B, length] M-RoPE ids of the prefill columns (Qwen2-VL families)
    decoding: bool = False

    def segment_for(self, layer: int) -> _Segment | None:
        seg = None
        for s in self.segments:
            if s.stage.layer <= layer:
                seg = s
        return seg

    def current_padding(self, layer: int) -> Tensor:
        seg = self.segment_for(layer)
        if seg is None:
            return self.padding
        kept = self.padding.gather(1, seg.keep)
        return kept if seg.alive is None else kept & seg.alive


class PipelineRun:
    """A plan installed on a model. Yielded by :func:`apply`; read it after a forward or generate.

    Attributes:
        plan: the compiled plan being executed.
        trace: after a prefill, ``trace[stage][sample]`` is a LongTensor of the original indices
            (``0..N-1`` over the sample's image tokens) of the tokens that survive that stage;
            for merged tokens, the index of each group's representative. Separator placeholders
            (LLaVA-NeXT's newline tokens) are not image tokens: they are never counted or dropped.
        groups: after a prefill, ``groups[stage][sample]`` is ``[N]``: the output token each
            original image token belongs to after that stage (-1 if dropped).
    """

    def __init__(self, model: nn.Module, plan: Plan, adapter: ModelAdapter, proxyv_adapter: Any = None):
        self.model = model
        self.plan = plan
        self.adapter = adapter
        self.proxyv_adapter = proxyv_adapter
        self._proxyv_state: Any = None
        self._trace: list[list[Tensor]] = []
        self._groups: list[list[Tensor]] = []
        self.image_tokens_per_layer: list[int] = []
        self._prefill: _Prefill | None = None
        self._images: list[_ImageRecord] = []
        self._vision: dict[str, Tensor] = {}
        self._crop_inputs: Tensor | None = None  # projector inputs of every crop (packing families)
        needs = set().union(*(s.reducer.needs for s in plan.stages)) if plan.stages else set()
        self._vision_needs = needs & VISION_SIGNALS
        self._pre_llm = [s for s in plan.stages if s.placement in ("vision", "projector")]
        backend = getattr(model.config.get_text_config(), "_attn_implementation", None) or ""
        self._flat_masks = "flash" in str(backend)  # flash-attn layers take 2-D padding masks only
        self._llm = plan.at("llm")

    # ------------------------------------------------------------------ public helpers
    @property
    def trace(self) -> list[list[Tensor]]:
        return self._with_proxyv(self._trace, "index")

    @property
    def groups(self) -> list[list[Tensor]]:
        return self._with_proxyv(self._groups, "assign")

    def _with_proxyv(self, entries: list[list[Tensor]], field_name: str) -> list[list[Tensor]]:
        """The proxyv stage (always last) keeps every token it receives: its entry is the tokens'
        state when the prefill ended."""
        if self._prefill is None or not self.plan.stages or self.plan.stages[-1].placement != "proxyv":
            return entries
        return [*entries[:-1], [getattr(s.meta, field_name) for s in self._prefill.samples]]

    @property
    def output_positions(self) -> Tensor | None:
        """``[B, L_out]``: for each row of the last prefill's logits, the column of the caller's
        ``input_ids`` it belongs to (-1 for padding the runtime added)."""
        p = self._prefill
        if p is None:
            return None
        if not p.segments:
            return p.source_columns
        last = p.segments[-1]
        rows = p.source_columns.gather(1, last.keep)
        return rows if last.alive is None else rows.masked_fill(~last.alive, -1)

    # ------------------------------------------------------------------ installation
    def install(self, hooks: HookSet) -> None:
        if self.plan.is_vanilla:
            return
        a = self.adapter
        hooks.pre(a.base, self._base_pre)
        if a.vision_attention is not None and self._vision_needs:
            hooks.post(a.vision_attention, self._vision_probe)
        hooks.pre(a.projector, self._projector_pre)
        if a.packs_features:  # pre-LLM stages run on each image's packed features
            a.hook_packed_features(hooks, self._packed_features)
        else:
            hooks.post(a.projector, self._projector_post)
        pv = self.plan.proxyv
        if pv is not None:
            from ..proxyv.layer import ProxyVDecoderLayer

            for i in range(pv.layer, len(a.layers)):
                hooks.swap(a.layers, i, ProxyVDecoderLayer(a.layers[i], self, i))
        if self._llm:
            first = self._llm[0].layer
            for i in range(first, len(a.layers)):
                hooks.pre(a.layers[i], self._make_layer_hook(i))
            for stage in self._llm:
                if stage.reducer.needs & LLM_SIGNALS:
                    hooks.post(a.layers[stage.layer - 1].self_attn, self._make_llm_probe(stage))

    # ------------------------------------------------------------------ vision side
    def _vision_probe(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._vision = self.adapter.vision_signals(module, args, kwargs, self._vision_needs)

    def _vision_for_features(self, i: int) -> dict[str, Tensor]:
        start = 0 if self.adapter.features_have_cls else 1
        return {name: value[i, start:] for name, value in self._vision.items()}

    def _projector_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        feats = args[0] if args else kwargs["image_features"]
        self._images = []
        if self.adapter.packs_features:
            self._crop_inputs = feats
            return None
        grids = self.plan.geometry.grids
        for i in range(feats.shape[0]):
            state = TokenState.initial(feats[i], grids if grids and feats.shape[1] == self.plan.geometry.image_tokens
                                       else None)
            self._images.append(_ImageRecord(state, self._vision_for_features(i)))
        stages = [s for s in self._pre_llm if s.placement == "vision"]
        if not stages:
            return None
        self._run_image_stages(stages)
        out = self._stacked_images()
        return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "image_features": out})

    def _projector_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        for rec, hidden in zip(self._images, output):
            rec.state = rec.state.with_hidden(hidden)
        stages = [s for s in self._pre_llm if s.placement == "projector"]
        if not stages:
            return None
        self._run_image_stages(stages)
        return self._stacked_images()

    def _packed_features(self, packed: list[Tensor], layouts: list[Any]) -> list[Tensor]:
        """Pre-LLM stages on packed images (LLaVA-NeXT, Qwen2-VL): each image is one state whose crops
        are the layout's grids; separators (newlines) are taken out before the stages and put back
        after them, each after the surviving tokens that preceded it."""
        a = self.adapter
        rows_in = None if self._crop_inputs is None else a.projector_rows(self._crop_inputs)
        total = sum(lay.crops for lay in layouts)
        if rows_in is None or rows_in.shape[0] != total:
            raise ModelError(f"the projector saw {0 if rows_in is None else rows_in.shape[0]} crops, but the "
                             f"images' sizes give {total}; compute image features inside the `apply` block")
        vision_stages = [s for s in self._pre_llm if s.placement == "vision"]
        signals = {name: a.signal_rows(value) for name, value in self._vision.items()}
        self._images, start = [], 0
        for run, lay in zip(packed, layouts):
            device = run.device
            sep = lay.separators.to(device)
            src = lay.source.to(device)[~sep]
            vision = {name: value[start:start + lay.crops].flatten(0, 1)[src] for name, value in signals.items()}
            hidden = rows_in[start:start + lay.crops].flatten(0, 1)[src] if vision_stages else run[~sep]
            state = TokenState.initial(hidden, lay.grids, lay.crop_ids.to(device))
            rec = _ImageRecord(state, vision, crops=len(lay.grids), separators=sep, separator_values=run[sep])
            self._images.append(rec)
            start += lay.crops
        if vision_stages:
            self._run_image_stages(vision_stages)
            for rec in self._images:  # per token; bypasses this run's own projector hook
                rec.state = rec.state.with_hidden(a.project(rec.state.hidden))
        stages = [s for s in self._pre_llm if s.placement == "projector"]
        if stages:
            self._run_image_stages(stages)
        out = []
        for rec in self._images:
            sep = rec.separators
            before = torch.cumsum(~sep, 0)[sep]  # original tokens before each separator
            kept_before = (rec.state.index[None, :] < before[:, None]).sum(1)
            at = kept_before + torch.arange(before.numel(), device=sep.device)
            new_sep = torch.zeros(rec.state.n + before.numel(), dtype=torch.bool, device=sep.device)
            new_sep[at] = True
            values = rec.separator_values
            row = values.new_empty(new_sep.numel(), values.shape[-1])
            row[new_sep] = values
            row[~new_sep] = rec.state.hidden.to(values.dtype)
            rec.separators = new_sep
            out.append(row)
        return out

    def _run_image_stages(self, stages: list[PlannedStage]) -> None:
        for rec in self._images:
            for stage in stages:
                signals = _signals(stage, rec.state, rec.vision)
                rec.state = _checked_reduce(stage, rec.state, signals)
                rec.history.append(rec.state)

    def _stacked_images(self) -> Tensor:
        """``[images, n, D]`` (a non-packing family: every image keeps the same number of tokens)."""
        return torch.stack([rec.state.hidden for rec in self._images])

    # ------------------------------------------------------------------ base model: prefill / decode
    def _base_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
            args = ()
        encoder_outputs = kwargs.get("mm_encoder_outputs") or {}
        has_images = kwargs.get("pixel_values") is not None or encoder_outputs.get("image") is not None
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        if not has_images:
            if past > 0 and self._prefill is not None:
                return args, self._decode_kwargs(kwargs, past)
            self._prefill = None
            return None
        if past > 0:
            raise ModelError(
                "a pipeline reduces tokens at prefill, but this call continues a filled cache; "
                "start a new conversation (fresh cache) for each image prompt"
            )
        if kwargs.get("pixel_values") is not None:
            features = self.adapter.image_features(kwargs)
            kwargs = {**kwargs, "pixel_values": None, "mm_encoder_outputs": {**encoder_outputs, "image": features}}
            encoder_outputs = kwargs["mm_encoder_outputs"]
        n_images = len(encoder_outputs["image"].pooler_output)
        if len(self._images) < n_images:
            raise ModelError(
                "image features were computed outside this pipeline's hooks; pass pixel_values "
                "(or encode images inside the `apply` block)"
            )
        images, self._images = self._images[-n_images:], []
        return args, self._start_prefill(kwargs, images)

    def _start_prefill(self, kwargs: dict, images: list[_ImageRecord]) -> dict:
        a = self.adapter
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        is_image = a.image_token_mask(ids, embeds)
        batch, length = is_image.shape
        mask2d = kwargs.get("attention_mask")
        real = torch.ones(batch, length, dtype=torch.bool, device=is_image.device) if mask2d is None else mask2d.bool()
        n_orig = [rec.run_in for rec in images]
        n_new = [rec.run_out for rec in images]
        # assign images to samples in reading order
        per_sample: list[list[int]] = []
        cursor = 0
        for b in range(batch):
            want, have, mine = int(is_image[b].sum()), 0, []
            while have < want and cursor < len(images):
                mine.append(cursor)
                have += n_orig[cursor]
                cursor += 1
            if have != want:
                raise ModelError(
                    f"sample {b} has {want} image placeholder tokens but its images give {have} features; "
                    "build the prompt with the model's processor"
                )
            per_sample.append(mine)
        rewritten = n_orig != n_new
        keep_cols = []
        for b in range(batch):
            keep = ~is_image[b]
            pos = torch.nonzero(is_image[b]).flatten()
            start = 0
            for j in per_sample[b]:
                keep[pos[start: start + n_new[j]]] = True
                start += n_orig[j]
            keep_cols.append(torch.nonzero(keep).flatten())
        new_len = max(int(k.numel()) for k in keep_cols)
        source = torch.full((batch, new_len), -1, dtype=torch.long, device=is_image.device)
        for b, cols in enumerate(keep_cols):
            source[b, new_len - cols.numel():] = cols
        present = source >= 0
        safe = source.clamp(min=0)
        padding = real.gather(1, safe) & present
        removed = real.sum(1) - padding.sum(1)
        new_mask = None
        mrope = self._prompt_mrope(kwargs, ids, mask2d) if a.mrope else None
        if rewritten:
            if ids is not None:
                kwargs["input_ids"] = ids.gather(1, safe).masked_fill(~present, a.pad_token_id)
            if embeds is not None:
                kwargs["inputs_embeds"] = embeds.gather(1, safe[..., None].expand(-1, -1, embeds.shape[-1]))
            new_mask = padding.long()
            if mask2d is not None or not bool(padding.all()):
                kwargs["attention_mask"] = new_mask.to(mask2d.dtype if mask2d is not None else torch.long)
            if mrope is not None:
                mrope = self._rewrite_mrope(kwargs, mrope, safe, present, padding)
            elif kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = (new_mask.cumsum(-1) - 1).clamp(min=0)
            is_image = is_image.gather(1, safe) & present
        samples = self._samples(is_image, per_sample, images)
        self._trace = [[] for _ in self.plan.stages]
        self._groups = [[] for _ in self.plan.stages]
        for si in range(len(self._pre_llm)):
            for mine in per_sample:
                state = _sample_state([images[j].history[si] for j in mine], [images[j].crops for j in mine],
                                      is_image.device)
                self._trace[si].append(state.index)
                self._groups[si].append(state.assign)
        self._proxyv_state = None
        self._prefill = _Prefill(
            batch=batch, length=new_len, padding=padding, source_columns=source,
            rewritten=rewritten, new_mask=new_mask, input_length=length, removed=removed, samples=samples,
            mrope=mrope,
        )
        self.image_tokens_per_layer = [int(samples[0].slots.numel())] * len(a.layers) if samples else []
        return kwargs

    def _prompt_mrope(self, kwargs: dict, ids: Tensor | None, mask2d: Tensor | None) -> Tensor:
        """``[3, B, L]`` the M-RoPE ids of the prompt as the caller built it: from ``position_ids``
        (``generate`` passes a text row plus the three M-RoPE rows) or computed the model's way."""
        pos = kwargs.get("position_ids")
        if pos is not None:
            if pos.dim() == 3:
                return pos[-3:]
            return pos[None].expand(3, -1, -1)
        if ids is None:
            raise ModelError("a Qwen2-VL prompt given as inputs_embeds needs explicit position_ids while a "
                             "pipeline is applied; pass input_ids instead")
        positions, _ = self.adapter.rope_index(ids, kwargs.get("mm_token_type_ids"), kwargs.get("image_grid_thw"),
                                               mask2d)
        return positions

    def _rewrite_mrope(self, kwargs: dict, mrope: Tensor, safe: Tensor, present: Tensor, padding: Tensor) -> Tensor:
        """After a placeholder rewrite: every kept token keeps its original M-RoPE ids (text after the
        image too, so decode positions continue from the original prompt's); the text row, which
        only orders the sequence, is renumbered; ``mm_token_type_ids`` shrinks with the prompt and
        the model's ``rope_deltas`` match the shorter cache."""
        new = mrope.gather(2, safe[None].expand(3, -1, -1)).masked_fill(~present[None], 0)
        text_row = (padding.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = torch.cat([text_row[None].to(new.dtype), new])
        types = kwargs.get("mm_token_type_ids")
        if types is not None:
            kwargs["mm_token_type_ids"] = types.gather(1, safe).masked_fill(~present, 0)
        last = new.masked_fill(~padding[None], -1).amax(dim=(0, 2))
        self.adapter.base.rope_deltas = (last + 1 - padding.sum(1))[:, None]
        return new

    def _samples(self, is_image: Tensor, per_sample: list[list[int]], images: list[_ImageRecord]) -> list[_Sample]:
        out = []
        for b, mine in enumerate(per_sample):
            slots = torch.nonzero(is_image[b]).flatten()
            runs = [images[j].separators for j in mine]
            if any(r is not None for r in runs):  # separators are not image tokens for reducers
                tokens = torch.cat([~r if r is not None else torch.ones(images[j].state.n, dtype=torch.bool)
                                    for j, r in zip(mine, runs)]).to(slots.device)
                slots = slots[tokens]
            meta = _sample_state([images[j].state for j in mine], [images[j].crops for j in mine], slots.device)
            vision = {name: torch.cat([images[j].vision[name] for j in mine])
                      for name in (images[mine[0]].vision if mine else {})}
            out.append(_Sample(slots, meta, vision))
        return out

    def _decode_kwargs(self, kwargs: dict, past: int) -> dict:
        p = self._prefill
        p.decoding = True
        if not p.rewritten:
            return kwargs
        mask = kwargs.get("attention_mask")
        q = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
        if mask is not None:
            if mask.shape[1] == p.input_length + (past - p.length) + q:
                mask = torch.cat([p.new_mask.to(mask.dtype), mask[:, p.input_length:]], dim=1)
            kwargs = {**kwargs, "attention_mask": mask}
        elif not bool(p.padding.all()):
            tail = torch.ones(p.batch, past - p.length + q, dtype=torch.long, device=p.padding.device)
            kwargs = {**kwargs, "attention_mask": torch.cat([p.new_mask, tail], dim=1)}
        pos = kwargs.get("position_ids")
        if pos is not None:
            shift = p.removed.to(pos.device)[:, None]
            if pos.dim() == 2:
                pos = pos - shift
            elif pos.shape[0] == 4:  # text row + M-RoPE rows: the M-RoPE rows already continue the originals
                pos = torch.cat([pos[:1] - shift, pos[1:]])
            kwargs = {**kwargs, "position_ids": pos}
        return kwargs

    # ------------------------------------------------------------------ decoder side
    def _make_llm_probe(self, stage: PlannedStage):
        needs = stage.reducer.needs

        def probe(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            p = self._prefill
            if p is None or p.decoding:
                return
            hidden = kwargs["hidden_states"]
            rope = tuple(t.expand(hidden.shape[0], -1, -1) for t in kwargs["position_embeddings"])
            pad = p.current_padding(stage.layer - 1)
            signals: dict[str, Any] = {}
            if "text_attention" in needs:
                signals["text_attention"] = last_query_attention(module, hidden, rope, None if bool(pad.all()) else pad)
            if "llm_keys" in needs:
                signals["llm_keys"] = module.k_proj(hidden)
            if "text_image_attention" in needs:
                rows = []
                for b, sample in enumerate(p.samples):
                    first = int(sample.slots.max()) + 1 if sample.slots.numel() else 0
                    query = torch.arange(first, hidden.shape[1], device=hidden.device)
                    rows.append(rows_attention(module, hidden[b:b + 1], (rope[0][b:b + 1], rope[1][b:b + 1]),
                                               query, pad[b:b + 1])[0])
                signals["text_image_attention"] = rows
            p.llm_signals[stage.layer] = signals

        return probe

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            p = self._prefill
            if p is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if not p.decoding:
                stage = next((s for s in self._llm if s.layer == layer), None)
                if stage is not None:
                    hidden = self._run_llm_stage(stage, hidden)
                seg = p.segment_for(layer)
                if seg is None:
                    return None
                self._slice_prefill_kwargs(seg, kwargs)
                source = kwargs.get("attention_mask")
                mask = seg.sliced_mask(False, source, hidden.shape[1], lambda: _mask_filler(
                    _slice_square_mask(source, seg.keep), seg.alive, square=True, flat=self._flat_masks))
                new = {**kwargs, "attention_mask": mask, "position_embeddings": seg.position_embeddings,
                       "position_ids": seg.position_ids}
            else:
                seg = p.segment_for(layer)
                if seg is None:
                    return None
                source = kwargs.get("attention_mask")
                cache = kwargs.get("cache")
                total = cache.get_seq_length(layer) + hidden.shape[1]  # keys of this layer: kept prefill + later
                new = {**kwargs, "attention_mask": seg.sliced_mask(
                    True, source, total, lambda: self._decode_mask(seg, source, total, hidden.shape[1]))}
            if args:
                return (hidden, *args[1:]), new
            return args, {**new, "hidden_states": hidden}

        return hook

    def _run_llm_stage(self, stage: PlannedStage, hidden: Tensor) -> Tensor:
        p = self._prefill
        prev = p.segment_for(stage.layer - 1)
        current_len = hidden.shape[1]
        stage_idx = next(i for i, s in enumerate(self.plan.stages) if s is stage)
        keeps, new_hidden_rows = [], []
        for b, sample in enumerate(p.samples):
            state = sample.meta.with_hidden(hidden[b, sample.slots]) if sample.slots.numel() else None
            if state is None:
                keeps.append(torch.arange(current_len, device=hidden.device))
                new_hidden_rows.append((None, None))
                self._trace[stage_idx].append(torch.empty(0, dtype=torch.long))
                self._groups[stage_idx].append(torch.empty(0, dtype=torch.long))
                continue
            signals = _signals(stage, state, sample.vision, p.llm_signals.get(stage.layer), b, sample.slots)
            new = _checked_reduce(stage, state, signals)
            lookup = torch.full((state.n_original,), -1, dtype=torch.long, device=hidden.device)
            lookup[state.index] = torch.arange(state.n, device=hidden.device)
            local = lookup[new.index]
            if bool((local < 0).any()):
                raise ModelError(f"{stage.name}: an output token's representative is not one of its input tokens")
            image_cols = sample.slots[local]
            text = torch.ones(current_len, dtype=torch.bool, device=hidden.device)
            text[sample.slots] = False
            keep = torch.sort(torch.cat([torch.nonzero(text).flatten(), image_cols])).values
            keeps.append(keep)
            new_hidden_rows.append((image_cols, new.hidden))
            sample.meta = new.with_hidden(torch.empty(new.n, 0, device=hidden.device))
            self._trace[stage_idx].append(new.index)
            self._groups[stage_idx].append(new.assign)
        # Samples that keep fewer tokens are filled up with some of their dropped columns, masked out
        # everywhere (keys, probes, decode), so the batch stays rectangular and each sample computes
        # exactly what it would alone.
        longest = max(int(k.numel()) for k in keeps)
        rows, alive_rows = [], []
        for b, (keep, sample) in enumerate(zip(keeps, p.samples)):
            alive = torch.ones(longest, dtype=torch.bool, device=hidden.device)
            if keep.numel() < longest:
                spare = torch.ones(current_len, dtype=torch.bool, device=hidden.device)
                spare[keep] = False
                filler = torch.nonzero(spare).flatten()[: longest - keep.numel()]
                keep = torch.sort(torch.cat([keep, filler])).values
                alive = ~torch.isin(keep, filler)
                keeps[b] = keep
            row = hidden[b, keep].clone()
            image_cols, values = new_hidden_rows[b]
            if values is not None:
                new_slots = torch.searchsorted(keep, image_cols)
                row[new_slots] = values.to(row.dtype)
                sample.slots = new_slots
            rows.append(row)
            alive_rows.append(alive)
        local_keep = torch.stack(keeps)
        local_alive = torch.stack(alive_rows)
        keep = local_keep if prev is None else prev.keep.gather(1, local_keep)
        if prev is not None and prev.alive is not None:
            local_alive = local_alive & prev.alive.gather(1, local_keep)
        p.segments.append(_Segment(stage, keep, None if bool(local_alive.all()) else local_alive))
        count = int(p.samples[0].slots.numel())
        for i in range(stage.layer, len(self.image_tokens_per_layer)):
            self.image_tokens_per_layer[i] = count
        return torch.stack(rows)

    def proxyv_state(self, hidden: Tensor, kwargs: dict) -> Any:
        """The ProxyV state of this prefill (made at the first ProxyV layer), or None when the layer
        should run as usual (decode steps, calls without images)."""
        p = self._prefill
        if p is None or p.decoding:
            return None
        if self._proxyv_state is None:
            self._proxyv_state = self._begin_proxyv(hidden, kwargs)
        return self._proxyv_state

    def _begin_proxyv(self, hidden: Tensor, kwargs: dict) -> Any:
        """One batched state when every sample holds the same image tokens and grids, else one state
        per sample (ProxyV layers then run sample by sample)."""
        p = self._prefill
        batch, length, _ = hidden.shape
        pos = kwargs.get("position_ids")
        positions = (torch.arange(length, device=hidden.device)[None] if pos is None else pos).expand(batch, -1)
        padding = p.current_padding(self.plan.proxyv.layer)
        mrope = p.mrope
        seg = p.segment_for(self.plan.proxyv.layer)
        if mrope is not None and seg is not None:
            mrope = mrope.gather(2, seg.keep[None].expand(3, -1, -1))
        first = p.samples[0]
        if first.slots.numel() and all(s.slots.numel() == first.slots.numel() and s.meta.grids == first.meta.grids
                                       for s in p.samples):
            image = torch.stack([s.slots for s in p.samples])
            return self._proxyv_state_for(hidden, image, positions, padding, first.meta, mrope)
        return [self._proxyv_state_for(hidden[b:b + 1], s.slots[None], positions[b:b + 1], padding[b:b + 1], s.meta,
                                       None if mrope is None else mrope[:, b:b + 1])
                for b, s in enumerate(p.samples)]

    def _proxyv_state_for(self, hidden: Tensor, image: Tensor, positions: Tensor, padding: Tensor,
                          meta: TokenState, mrope: Tensor | None = None) -> Any:
        from ..proxyv.layer import ProxyVState, make_proxies

        batch, length, _ = hidden.shape
        is_other = torch.ones(batch, length, dtype=torch.bool, device=hidden.device).scatter(1, image, False)
        others = torch.stack([torch.nonzero(row).flatten() for row in is_other])
        if image.shape[1] == 0:  # a sample without images: no proxies, and the layer is an ordinary one
            proxies = hidden.new_zeros(batch, 0, hidden.shape[-1])
            empty = positions.new_zeros(batch, 0)
            rope = self.adapter.rotary(proxies, empty if mrope is None else empty[None].expand(3, -1, -1))
            no_tokens = torch.zeros(0, dtype=torch.long, device=hidden.device)
            return ProxyVState(image, others, positions, padding, proxies, empty, rope, no_tokens, None)
        tokens = hidden.gather(1, image[..., None].expand(-1, -1, hidden.shape[-1]))
        proxies, assign, splat = make_proxies(self.plan.proxyv.reducer, self.proxyv_adapter, tokens, meta.grids,
                                              meta.crop_ids)
        start = positions.gather(1, image).min(dim=1, keepdim=True).values
        proxy_positions = start + torch.arange(proxies.shape[1], device=hidden.device)[None]
        if mrope is None:
            rope = self.adapter.rotary(proxies, proxy_positions)
        else:
            image_mrope = mrope.gather(2, image[None].expand(3, -1, -1))
            rope = self.adapter.rotary(proxies, _proxy_mrope(self.plan.proxyv.reducer, meta, image_mrope))
        return ProxyVState(image, others, positions, padding, proxies, proxy_positions, rope, assign, splat)

    def _slice_prefill_kwargs(self, seg: _Segment, kwargs: dict) -> None:
        """RoPE and position ids of the kept columns (the same for every layer of the segment)."""
        if seg.position_embeddings is not None:
            return
        keep = seg.keep
        batch = keep.shape[0]
        cos, sin = (t.expand(batch, -1, -1) for t in kwargs["position_embeddings"])
        idx = keep[..., None].expand(-1, -1, cos.shape[-1])
        seg.position_embeddings = (cos.gather(1, idx), sin.gather(1, idx))
        pos = kwargs.get("position_ids")
        seg.position_ids = None if pos is None else pos.expand(keep.shape[0], -1).gather(1, keep)

    def _decode_mask(self, seg: _Segment, mask: Any, total: int, queries: int) -> Any:
        """A decode step's mask over the segment's kept prefill columns and every later column."""
        mask = _slice_key_columns(mask, seg.keep, self._prefill.length)
        if seg.alive is None:
            return mask
        tail = torch.ones(seg.alive.shape[0], total - seg.alive.shape[1], dtype=torch.bool, device=seg.alive.device)
        return _mask_filler(mask, torch.cat([seg.alive, tail], 1), square=False, queries=queries, flat=self._flat_masks)


def _sample_state(states: list[TokenState], crops: list[int], device: Any) -> TokenState:
    """One sample's images as one state, without hidden states (they live in the sequence)."""
    states = [s.with_hidden(s.hidden[:, :0]) for s in states]
    return TokenState.concat(states, crops, device)


def _proxy_mrope(stage: Any, meta: TokenState, image_mrope: Tensor) -> Tensor:
    """``[3, B, P]`` M-RoPE ids of the proxies, in :func:`~lmmsqueeze.proxyv.layer.make_proxies` order.

    Like the paper's proxies, which take consecutive positions from the image's start, each group's
    proxies start at its image's first id ``s``: a spatial proxy grid is laid out as Qwen2-VL lays out
    an image (``(s, s + row, s + column)``), non-spatial proxies take ``s, s + 1, ...`` on all axes.
    """
    device = image_mrope.device
    starts = image_mrope[0]  # [B, n] temporal ids: an image's start on every one of its tokens
    parts = []
    if stage.variant == "spatial":
        for g, (oh, ow) in enumerate(stage.proxy_grids(meta.grids)):
            s = starts[:, meta.crop_ids == g].min(dim=1, keepdim=True).values  # [B, 1]
            rows = torch.arange(oh, device=device).repeat_interleave(ow)
            cols = torch.arange(ow, device=device).repeat(oh)
            parts.append(torch.stack([s.expand(-1, oh * ow), s + rows, s + cols]))
    else:
        for g in torch.unique(meta.crop_ids):
            s = starts[:, meta.crop_ids == g].min(dim=1, keepdim=True).values
            parts.append((s + torch.arange(stage.proxies, device=device))[None].expand(3, -1, -1))
    return torch.cat(parts, dim=2)


def _signals(stage: PlannedStage, state: TokenState, vision: dict[str, Tensor],
             llm: dict[str, Any] | None = None, b: int = 0, slots: Tensor | None = None) -> Signals:
    """The signals a stage declared, aligned with the slots of ``state``."""
    signals = Signals()
    for name in stage.reducer.needs:
        if name in VISION_SIGNALS:
            value = vision[name][state.index]
        elif name == "text_image_attention":
            value = llm[name][b][:, slots]
        else:
            value = llm[name][b, slots]
        setattr(signals, name, value)
    return signals


def _checked_reduce(stage: PlannedStage, state: TokenState, signals: Signals) -> TokenState:
    new = stage.reducer.reduce(state, signals)
    expected = stage.reducer.output_count(state.n, state.grids)
    if new.n != expected:
        raise ModelError(f"{stage.name} returned {new.n} tokens, but its output_count promises {expected}")
    return new


def _slice_square_mask(mask: Any, keep: Tensor) -> Any:
    """Restrict a prefill mask to the kept columns (queries and keys)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ModelError(f"attention masks of type {type(mask).__name__} are not supported; use sdpa, eager "
                         "or flash_attention_2")
    if mask.dim() == 2:
        return mask.gather(1, keep)
    h = mask.shape[1]
    n = keep.shape[1]
    rows = mask.expand(keep.shape[0], -1, -1, -1).gather(2, keep[:, None, :, None].expand(-1, h, -1, mask.shape[3]))
    return rows.gather(3, keep[:, None, None, :].expand(-1, h, n, -1))


def _mask_filler(mask: Any, alive: Tensor | None, square: bool, queries: int = 0, flat: bool = False) -> Any:
    """Mask out filler key columns (``alive`` False); build the causal mask when there was none:
    4-D for sdpa/eager, a 2-D padding mask for flash-attn (``flat``), which unpads the fillers."""
    if alive is None:
        return mask
    b, n = alive.shape
    if mask is None and flat:
        return alive.long()
    if mask is None:
        q = n if square else queries
        rows = torch.arange(q, device=alive.device)[:, None] + (n - q)  # key index of each query
        keys = torch.arange(n, device=alive.device)[None, :]
        return ((keys <= rows)[None, None] & alive[:, None, None, :]) | (keys == rows)[None, None]
    if mask.dim() == 2:
        return mask & alive.to(mask.dtype) if mask.dtype == torch.bool else mask * alive.to(mask.dtype)
    cols = alive[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & cols
    return mask.masked_fill(~cols, torch.finfo(mask.dtype).min)


def _slice_key_columns(mask: Any, keep: Tensor, prefill_length: int) -> Any:
    """Restrict a decode-step mask's key columns to the kept prefill columns plus all later ones."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ModelError(f"attention masks of type {type(mask).__name__} are not supported; use sdpa, eager "
                         "or flash_attention_2")
    total = mask.shape[-1]
    tail = torch.arange(prefill_length, total, device=keep.device).expand(keep.shape[0], -1)
    cols = torch.cat([keep, tail], dim=1)
    if mask.dim() == 2:
        return mask.gather(1, cols)
    b, h, q = mask.shape[:3]
    return mask.expand(keep.shape[0], -1, -1, -1).gather(3, cols[:, None, None, :].expand(-1, h, q, -1))


class InputCosts:
    """Analytic prefill costs for the images a run actually sees.

    A plan is compiled against the model's reference geometry; LLaVA-NeXT and Qwen2-VL images give
    as many tokens (and such grids) as their size says. :meth:`add` recompiles the pipeline for the
    geometry of every image of a batch (once per distinct geometry; a refusal, e.g. ``keep`` above
    a small image's token count, raises before the batch runs), and :meth:`cost` averages.
    """

    def __init__(self, plan: Plan, adapter: ModelAdapter):
        self.plan, self.adapter = plan, adapter
        self._plans: dict[Any, Plan] = {plan.geometry: plan}
        self._counts: dict[Any, int] = {}

    def add(self, inputs: Any) -> list[Any]:
        """Count the images of a batch; returns their geometries."""
        geometries = self.adapter.image_geometries(inputs)
        for g in geometries:
            if g not in self._plans:
                self._plans[g] = compile_pipeline(self.plan.canonical, g)
            self._counts[g] = self._counts.get(g, 0) + 1
        return geometries

    def tokens_per_layer(self) -> list[float]:
        """Image tokens entering each decoder layer, per image, averaged over the images seen."""
        counts = self._counts or {self.plan.geometry: 1}
        total = sum(counts.values())
        per_layer = [0.0] * self.plan.geometry.num_layers
        for g, n in counts.items():
            for i, t in enumerate(self._plans[g].tokens_per_layer()):
                per_layer[i] += t * n / total
        return [int(t) if float(t).is_integer() else round(t, 2) for t in per_layer]

    def cost(self, text_tokens: int) -> dict[str, float]:
        """``prefill_flops``, ``vanilla_prefill_flops`` (means over the images seen) and ``saving``."""
        counts = self._counts or {self.plan.geometry: 1}
        total = sum(counts.values())
        costs = [(self._plans[g].cost(text_tokens=text_tokens), n) for g, n in counts.items()]
        prefill = sum(c.prefill_flops * n for c, n in costs) / total
        vanilla = sum(c.vanilla_prefill_flops * n for c, n in costs) / total
        return {"prefill_flops": round(prefill), "vanilla_prefill_flops": round(vanilla),
                "saving": 1.0 - prefill / vanilla if vanilla else 0.0}


def compile_for(model: nn.Module, pipeline: str | PipelineSpec | Plan | None) -> tuple[Plan, ModelAdapter]:
    """Compile a pipeline against a loaded model's geometry."""
    adapter = adapter_for(model)
    plan = pipeline if isinstance(pipeline, Plan) else compile_pipeline(pipeline, adapter.geometry)
    return plan, adapter


@contextlib.contextmanager
def apply(model: nn.Module, pipeline: str | PipelineSpec | Plan | None, adapter: Any = None) -> Iterator[PipelineRun]:
    """Install a pipeline on a transformers model for the duration of a ``with`` block.

    Inside the block, ``model(...)`` and ``model.generate(...)`` run with the plan's reductions;
    on exit every hook is removed, whatever happened inside.

    Args:
        model: a supported transformers model (``LlavaForConditionalGeneration``).
        pipeline: pipeline text, a spec, or a compiled plan.
        adapter: trained ProxyV weights (a :class:`~lmmsqueeze.proxyv.ProxyVAdapter` or its
            directory) for a pipeline with a ``proxyv`` stage; without it the ProxyV modules are
            freshly initialised (seed 0).

    Example::

        with lmmsqueeze.apply(model, "pool | fastv(layer=2, keep=0.5)") as run:
            out = model.generate(**inputs, max_new_tokens=8)
        run.trace  # surviving original indices, per stage and sample
    """
    from ..proxyv.attach import resolve_adapter

    plan, model_adapter = compile_for(model, pipeline)
    proxyv_adapter = resolve_adapter(model, plan, adapter)
    run = PipelineRun(model, plan, model_adapter, proxyv_adapter)
    with HookSet() as hooks:
        run.install(hooks)
        yield run
