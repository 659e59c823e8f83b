"""The prefill runtime: executes a compiled :class:`~lmmsqueeze.compose.Plan` on a transformers model.

All intervention happens through module hooks installed by one :class:`~.hooks.HookSet`:

* a pre-hook on the multimodal base model detects a prefill with images, encodes the images
  (running ``vision``/``projector`` stages inside the projector hooks), rewrites each image's
  placeholder run to its reduced length and, on later decode steps, keeps the attention mask and
  position ids consistent with the shorter prompt;
* a pre-hook on the projector runs ``vision`` stages, a forward hook runs ``projector`` stages;
  for families that pack features after the projector (LLaVA-NeXT: base crop, unpadded sub-crop
  grid, newline tokens; Qwen2-VL: all images' merged patches in one tensor) both run on each
  image's packed features instead, through the family's
  :meth:`~lmmsqueeze.models.base.Family.hook_packed_features`; separator (newline) placeholders are
  never image tokens for any stage: they stay in the prompt like text;
* pre-hooks on decoder layers >= K run ``llm`` stages at layer K and slice hidden states, RoPE
  cos/sin, position ids and the attention mask for every later layer (prefill) or the mask's key
  columns (decode), so each layer's KV cache holds exactly the tokens that reached it;
* forward hooks on attention modules measure one-query signals (see :mod:`lmmsqueeze.attention`).

A stage's output order is the order its tokens take in the sequence, and its ``positions`` policy
(:mod:`.positions`) says which positions they take; decode steps continue each layer's numbering.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..compose.plan import Plan, PlannedStage, compile_pipeline
from ..compose.spec import PipelineSpec
from ..errors import ModelError
from ..reducers.base import LLM_SIGNALS, VISION_SIGNALS, Signals, TokenState
from ..models import Family, family_for
from .hooks import HookSet
from .llm_signals import previous_layer_signals, text_relevance
from .llm_stage import run_llm_stage, segment_rope, text_columns
from .masks import mask_filler, slice_key_columns, slice_square_mask
from .positions import next_position, rewritten_ids
from .records import ImageRecord, Prefill, Sample, Segment, rows_of


class PipelineRun:
    """A plan installed on a model. Yielded by :func:`apply`; read it after a forward or generate.

    Attributes:
        plan: the compiled plan being executed.
        trace: after a prefill, ``trace[stage][sample]`` is a LongTensor of the original indices
            (``0..N-1`` over the sample's image tokens) of the tokens that survive that stage, in the
            order they sit in the sequence; for merged tokens, the index of each group's representative;
            -1 for a token made from no single one (VisionZip's [CLS] feature). Separator placeholders
            (LLaVA-NeXT's newline tokens) are not image tokens: they are never counted or dropped.
        groups: after a prefill, ``groups[stage][sample]`` is ``[N]``: the output token (its place in
            ``trace[stage][sample]``) each original image token belongs to after that stage (-1 if dropped).
    """

    def __init__(self, model: nn.Module, plan: Plan, family: Family, weights: Any = None):
        self.model = model
        self.plan = plan
        self.family = family
        self.weights = weights
        self._proxyv_state: Any = None
        self._trace: list[list[Tensor]] = []
        self._groups: list[list[Tensor]] = []
        self.image_tokens_per_layer: list[int] = []
        self.prefill: Prefill | None = None
        self._images: list[ImageRecord] = []
        self._kept: list[list[int]] = []  # per image of the last prefill: tokens after each pre-LLM stage
        self._vision: dict[str, Tensor] = {}
        self._crop_inputs: Tensor | None = None  # projector inputs of every crop (packing families)
        available = plan.geometry.signals
        reads = set()
        for s in plan.stages:
            reads |= s.reducer.needs | (s.reducer.optional & available)
        self._vision_needs = reads & VISION_SIGNALS
        self._pre_llm = [s for s in plan.stages if s.placement in ("vision", "projector")]
        backend = getattr(model.config.get_text_config(), "_attn_implementation", None) or ""
        self._flat_masks = "flash" in str(backend)  # flash-attn layers take 2-D padding masks only
        self._llm = plan.at("llm")
        self._rows = 3 if family.mrope else 1

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
        if self.prefill is None or not self.plan.stages or self.plan.stages[-1].placement != "proxyv":
            return entries
        return [*entries[:-1], [getattr(s.meta, field_name) for s in self.prefill.samples]]

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
        return self._kept

    # ------------------------------------------------------------------ installation
    def install(self, hooks: HookSet) -> None:
        if self.plan.is_vanilla:
            return
        a = self.family
        hooks.pre(a.base, self._base_pre)
        if self._vision_needs:
            for module, probe in a.vision_probes(self._vision_needs):
                hooks.post(module, self._vision_hook(probe))
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
        if any("text_relevance" in s.reducer.needs for s in self._llm):
            hooks.pre(a.layers[0], self._relevance_hook)
        if self._llm:
            first = self._llm[0].layer
            for i in range(first, len(a.layers)):
                hooks.pre(a.layers[i], self._make_layer_hook(i))
            for stage in self._llm:
                needs = stage.reducer.needs & {"text_attention", "text_image_attention", "llm_keys", "text_keys"}
                if needs:
                    hooks.post(a.layers[stage.layer - 1].self_attn, self._make_llm_probe(stage, frozenset(needs)))

    # ------------------------------------------------------------------ vision side
    def _vision_hook(self, probe: Any) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._vision.update(probe(module, args, kwargs, output))

        return hook

    def _image_signals(self, i: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Image ``i``'s vision signals (non-packing families): rows of its patch tokens, and per-image ones."""
        start = 0 if self.family.features_have_cls else 1
        rows = {k: v[i, start:] for k, v in self._vision.items() if k != "cls_hidden"}
        extras = {k: v[i] for k, v in self._vision.items() if k == "cls_hidden"}
        return rows, extras

    def _projector_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        feats = args[0] if args else kwargs["image_features"]
        self._images = []
        if self.family.packs_features:
            self._crop_inputs = feats
            return None
        grids = self.plan.geometry.grids
        for i in range(feats.shape[0]):
            grid = grids if grids and feats.shape[1] == self.plan.geometry.image_tokens else None
            rows, extras = self._image_signals(i)
            self._images.append(ImageRecord.of(TokenState.initial(feats[i], grid), rows, extras, self._rows))
        stages = [s for s in self._pre_llm if s.placement == "vision"]
        if not stages:
            return None
        self._run_image_stages(stages)
        out = self._joined_images()
        return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "image_features": out})

    def _projector_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        pieces = output.reshape(-1, output.shape[-1]).split([rec.state.n for rec in self._images])
        for rec, hidden in zip(self._images, pieces):
            rec.state = rec.state.with_hidden(hidden)
        stages = [s for s in self._pre_llm if s.placement == "projector"]
        if stages:
            self._run_image_stages(stages)
        return self._joined_images()

    def _packed_features(self, packed: list[Tensor], layouts: list[Any]) -> list[Tensor]:
        """Pre-LLM stages on packed images (LLaVA-NeXT, Qwen2-VL): each image is one state whose crops
        are the layout's grids; separators (newlines) are taken out before the stages and put back
        after them, each after the surviving tokens that preceded it."""
        a = self.family
        rows_in = None if self._crop_inputs is None else a.projector_rows(self._crop_inputs)
        total = sum(lay.crops for lay in layouts)
        if rows_in is None or rows_in.shape[0] != total:
            raise ModelError(f"the projector saw {0 if rows_in is None else rows_in.shape[0]} crops, but the "
                             f"images' sizes give {total}; compute image features inside the `apply` block")
        vision_stages = [s for s in self._pre_llm if s.placement == "vision"]
        signals = {name: a.signal_rows(value) for name, value in self._vision.items() if name != "cls_hidden"}
        self._images, start = [], 0
        for run, lay in zip(packed, layouts):
            sep = lay.separators.to(run.device)
            src = lay.source.to(run.device)[~sep]
            vision = {name: value[start:start + lay.crops].flatten(0, 1)[src] for name, value in signals.items()}
            extras = {k: v[start:start + lay.crops, 0] for k, v in self._vision.items() if k == "cls_hidden"}
            hidden = rows_in[start:start + lay.crops].flatten(0, 1)[src] if vision_stages else run[~sep]
            state = TokenState.initial(hidden, lay.grids, lay.crop_ids.to(run.device))
            self._images.append(ImageRecord.of(state, vision, extras, self._rows, sep if bool(sep.any()) else None,
                                               run[sep], crops=len(lay.grids)))
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
            marks = rec.layout()
            if marks is None:
                out.append(rec.state.hidden)
                continue
            values = rec.separator_values
            row = values.new_empty(marks.numel(), values.shape[-1])
            row[marks] = values
            row[~marks] = rec.state.hidden.to(values.dtype)
            out.append(row)
        return out

    def _run_image_stages(self, stages: list[PlannedStage]) -> None:
        for rec in self._images:
            for stage in stages:
                signals = Signals()
                for name in stage.reducer.needs | stage.reducer.optional:
                    if name in rec.extras:
                        setattr(signals, name, rec.extras[name])
                    elif name in rec.vision:
                        setattr(signals, name, rows_of(rec.vision[name], rec.state.index))
                rec.apply(_checked_reduce(stage, rec.state, signals), stage.positions)

    def _joined_images(self) -> Tensor:
        """The images' tokens for the next module: ``[images, n, D]`` when every image kept as many,
        else all of them in one row ``[1, total, D]`` (the projector works token by token)."""
        states = [rec.state.hidden for rec in self._images]
        if len({s.shape[0] for s in states}) <= 1:
            return torch.stack(states)
        return torch.cat(states)[None]

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
            if past > 0 and self.prefill is not None:
                return args, self._decode_kwargs(kwargs, past)
            self.prefill = None
            return None
        if past > 0:
            raise ModelError(
                "a pipeline reduces tokens at prefill, but this call continues a filled cache; "
                "start a new conversation (fresh cache) for each image prompt"
            )
        if kwargs.get("pixel_values") is not None:
            features = self.family.image_features(kwargs)
            if not self.family.packs_features and self._images:  # each image as its stages left it
                features.pooler_output = [rec.state.hidden for rec in self._images]
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

    def _start_prefill(self, kwargs: dict, images: list[ImageRecord]) -> dict:
        a = self.family
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        is_image = a.image_token_mask(ids, embeds)
        batch, length = is_image.shape
        mask2d = kwargs.get("attention_mask")
        real = torch.ones(batch, length, dtype=torch.bool, device=is_image.device) if mask2d is None else mask2d.bool()
        n_orig = [rec.run_in for rec in images]
        n_new = [rec.run_out for rec in images]
        per_sample: list[list[int]] = []  # images of each sample, in reading order
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
        rewritten = n_orig != n_new or any(rec.span != rec.span_in for rec in images)
        keep_cols, runs = [], []
        for b in range(batch):
            keep = ~is_image[b]
            pos = torch.nonzero(is_image[b]).flatten()
            start, mine = 0, []
            for j in per_sample[b]:
                keep[pos[start: start + n_new[j]]] = True
                mine.append(pos[start: start + n_orig[j]])
                start += n_orig[j]
            keep_cols.append(torch.nonzero(keep).flatten())
            runs.append(mine)
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
        shift = torch.zeros(batch, dtype=torch.long, device=is_image.device)
        if rewritten:
            if ids is not None:
                kwargs["input_ids"] = ids.gather(1, safe).masked_fill(~present, a.pad_token_id)
            if embeds is not None:
                kwargs["inputs_embeds"] = embeds.gather(1, safe[..., None].expand(-1, -1, embeds.shape[-1]))
            new_mask = padding.long()
            if mask2d is not None or not bool(padding.all()):
                kwargs["attention_mask"] = new_mask.to(mask2d.dtype if mask2d is not None else torch.long)
            pos = kwargs.get("position_ids")
            orig = mrope if mrope is not None else (
                torch.arange(length, device=is_image.device)[None] if pos is None else pos).expand(batch, -1)[None]
            new_ids = rewritten_ids(orig, runs, [[images[j] for j in mine] for mine in per_sample], safe, present)
            shift = next_position(orig, real) - next_position(new_ids, padding)
            if mrope is not None:
                mrope = self._rewrite_mrope(kwargs, new_ids, safe, present, padding)
            else:
                kwargs["position_ids"] = new_ids[0]
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
        self._kept = [[h.n for h in rec.history] for rec in images]
        self._proxyv_state = None
        self.prefill = Prefill(
            batch=batch, length=new_len, padding=padding, source_columns=source, rewritten=rewritten,
            new_mask=new_mask, input_length=length, removed=removed, shift=shift, samples=samples, mrope=mrope,
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
        positions, _ = self.family.rope_index(ids, kwargs.get("mm_token_type_ids"), kwargs.get("image_grid_thw"),
                                               mask2d)
        return positions

    def _rewrite_mrope(self, kwargs: dict, new: Tensor, safe: Tensor, present: Tensor, padding: Tensor) -> Tensor:
        """After a placeholder rewrite: the M-RoPE ids of the stages' position policies; the text row,
        which only orders the sequence, is renumbered; ``mm_token_type_ids`` shrinks with the prompt
        and the model's ``rope_deltas`` continue the new ids at decode steps."""
        new = new.masked_fill(~present[None], 0)
        text_row = (padding.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = torch.cat([text_row[None].to(new.dtype), new])
        types = kwargs.get("mm_token_type_ids")
        if types is not None:
            kwargs["mm_token_type_ids"] = types.gather(1, safe).masked_fill(~present, 0)
        self.family.base.rope_deltas = (next_position(new, padding) - padding.sum(1))[:, None]
        return new

    def _samples(self, is_image: Tensor, per_sample: list[list[int]], images: list[ImageRecord]) -> list[Sample]:
        out = []
        for b, mine in enumerate(per_sample):
            slots = torch.nonzero(is_image[b]).flatten()
            runs = [images[j].layout() for j in mine]
            if any(r is not None for r in runs):  # separators are not image tokens for reducers
                tokens = torch.cat([~r if r is not None else torch.ones(images[j].state.n, dtype=torch.bool)
                                    for j, r in zip(mine, runs)]).to(slots.device)
                slots = slots[tokens]
            meta = _sample_state([images[j].state for j in mine], [images[j].crops for j in mine], slots.device)
            vision = {name: torch.cat([images[j].vision[name] for j in mine])
                      for name in (images[mine[0]].vision if mine else {})}
            owners = [torch.full((images[j].crops,), i, dtype=torch.long) for i, j in enumerate(mine)]
            image_of_crop = torch.cat(owners).to(slots.device) if owners else slots.new_zeros(0)
            out.append(Sample(slots, meta, vision, image_of_crop))
        return out

    def _decode_kwargs(self, kwargs: dict, past: int) -> dict:
        p = self.prefill
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
        shift = p.shift.to(p.padding.device)[:, None]
        if pos is not None and pos.dim() == 3:  # M-RoPE rows (after a text row, which orders the sequence)
            rows = pos[-3:] - shift
            pos = rows if pos.shape[0] == 3 else torch.cat([pos[:1] - p.removed.to(pos.device)[:, None], rows])
        elif not self.family.mrope:  # the caller's numbering (or the model's own), moved to the prompt's
            if pos is None:
                pos = (past + torch.arange(q, device=shift.device))[None] + (p.input_length - p.length)
            pos = pos - shift
        # (M-RoPE without position ids: the model continues from rope_deltas, which the rewrite set)
        return {**kwargs, "position_ids": pos}

    # ------------------------------------------------------------------ decoder side
    def _relevance_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the decoder input: each sample's text relevance (a prefill with images only)."""
        p = self.prefill
        if p is None or p.decoding:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        p.relevance = []
        for b, sample in enumerate(p.samples):
            text = text_columns(sample, p.padding[b])
            p.relevance.append(text_relevance(hidden[b, sample.slots], hidden[b, text]))

    def _make_llm_probe(self, stage: PlannedStage, needs: frozenset[str]):
        def probe(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            p = self.prefill
            if p is None or p.decoding:
                return
            hidden = kwargs["hidden_states"]
            rope = tuple(t.expand(hidden.shape[0], -1, -1) for t in kwargs["position_embeddings"])
            pad = p.current_padding(stage.layer - 1)
            text = [text_columns(s, pad[b]) for b, s in enumerate(p.samples)]
            p.llm_signals[stage.layer] = previous_layer_signals(module, hidden, rope, pad, text, needs)

        return probe

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            p = self.prefill
            if p is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if not p.decoding:
                stage = next((s for s in self._llm if s.layer == layer), None)
                if stage is not None:
                    hidden = self._llm_stage(stage, hidden, module, kwargs)
                seg = p.segment_for(layer)
                if seg is None:
                    return None
                if seg.position_embeddings is None:
                    seg.position_embeddings = segment_rope(self.family, hidden, seg)
                source = kwargs.get("attention_mask")
                mask = seg.sliced_mask(False, source, hidden.shape[1], lambda: mask_filler(
                    slice_square_mask(source, seg.keep), seg.alive, square=True, flat=self._flat_masks))
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
                if bool((seg.delta != 0).any()):
                    rope = kwargs["position_embeddings"]
                    new["position_embeddings"] = seg.shifted_rope(rope, lambda: self._shift(rope, seg.delta))
            if args:
                return (hidden, *args[1:]), new
            return args, {**new, "hidden_states": hidden}

        return hook

    def _llm_stage(self, stage: PlannedStage, hidden: Tensor, layer: nn.Module, kwargs: dict) -> Tensor:
        p = self.prefill
        prev = p.segment_for(stage.layer - 1)
        if p.ids is None:  # the first llm stage: the prefill's own positions
            pos = kwargs.get("position_ids")
            pos = torch.arange(hidden.shape[1], device=hidden.device)[None] if pos is None else pos
            p.ids = p.mrope if p.mrope is not None else pos.expand(hidden.shape[0], -1)[None]
        rope = prev.position_embeddings if prev is not None else kwargs["position_embeddings"]
        seg, rows = run_llm_stage(self, stage, hidden, layer, rope, prev)
        p.segments.append(seg)
        count = int(p.samples[0].slots.numel())
        for i in range(stage.layer, len(self.image_tokens_per_layer)):
            self.image_tokens_per_layer[i] = count
        return rows

    def record(self, stage: PlannedStage, index: Tensor, assign: Tensor) -> None:
        """Trace one sample's tokens after an llm stage."""
        self._trace[stage.index].append(index)
        self._groups[stage.index].append(assign)

    def _shift(self, rope: tuple[Tensor, Tensor], delta: Tensor) -> tuple[Tensor, Tensor]:
        from .positions import shift_rope

        cos, sin = (t.expand(delta.shape[0], -1, -1) for t in rope)
        return shift_rope(cos, sin, self.family.rotary, delta.to(cos.device), self.family.mrope)

    def proxyv_state(self, hidden: Tensor, kwargs: dict) -> Any:
        """The ProxyV state of this prefill (made at the first ProxyV layer), or None when the layer
        should run as usual (decode steps, calls without images)."""
        p = self.prefill
        if p is None or p.decoding:
            return None
        if self._proxyv_state is None:
            from .proxyv_state import begin_proxyv

            self._proxyv_state = begin_proxyv(self, hidden, kwargs)
        return self._proxyv_state

    def _decode_mask(self, seg: Segment, mask: Any, total: int, queries: int) -> Any:
        """A decode step's mask over the segment's kept prefill columns and every later column."""
        mask = slice_key_columns(mask, seg.keep, self.prefill.length)
        if seg.alive is None:
            return mask
        tail = torch.ones(seg.alive.shape[0], total - seg.alive.shape[1], dtype=torch.bool, device=seg.alive.device)
        return mask_filler(mask, torch.cat([seg.alive, tail], 1), square=False, queries=queries, flat=self._flat_masks)


def _sample_state(states: list[TokenState], crops: list[int], device: Any) -> TokenState:
    """One sample's images as one state, without hidden states (they live in the sequence)."""
    states = [s.with_hidden(s.hidden[:, :0]) for s in states]
    return TokenState.concat(states, crops, device)


def _checked_reduce(stage: PlannedStage, state: TokenState, signals: Signals) -> TokenState:
    new = stage.reducer.reduce(state, signals)
    expected = stage.reducer.output_count(state.n, state.grids)
    if new.n != expected and not stage.adaptive:
        raise ModelError(f"{stage.name} returned {new.n} tokens, but its output_count promises {expected}")
    return new


def compile_for(model: nn.Module, pipeline: str | PipelineSpec | Plan | None) -> tuple[Plan, Family]:
    """Compile a pipeline against a loaded model's geometry."""
    family = family_for(model)
    plan = pipeline if isinstance(pipeline, Plan) else compile_pipeline(pipeline, family.geometry)
    return plan, family


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

    plan, family = compile_for(model, pipeline)
    run = PipelineRun(model, plan, family, resolve_adapter(model, plan, adapter))
    with HookSet() as hooks:
        run.install(hooks)
        yield run


__all__ = ["LLM_SIGNALS", "PipelineRun", "apply", "compile_for"]
