"""The prefill rewrite: each image's placeholder run becomes its reduced length, and later decode
steps keep the attention mask and position ids consistent with the shorter prompt.

:class:`PrefillHook` is a pre-hook on the multimodal base model: on a prefill with images it encodes
them (the pre-LLM stages run inside :mod:`.images`' hooks), rewrites the prompt (ids or embeddings,
mask, positions; M-RoPE ids by the model's rule) and records the prefill (:class:`~.records.Prefill`)
that the decoder-side placements read; on a decode step it continues the shorter prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..reducers.base import TokenState
from .positions import next_position, rewritten_ids
from .records import ImageRecord, Prefill, Sample


class PrefillHook:
    """The base model's pre-hook of one :class:`~.run.PipelineRun`."""

    def __init__(self, run: Any):
        self.run = run

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
            args = ()
        encoder_outputs = kwargs.get("mm_encoder_outputs") or {}
        has_images = kwargs.get("pixel_values") is not None or encoder_outputs.get("image") is not None
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        if not has_images:
            if past > 0 and self.run.prefill is not None:
                return args, self._decode_kwargs(kwargs, past)
            self.run.prefill = None
            return None
        if past > 0:
            raise ModelError(
                "a pipeline reduces tokens at prefill, but this call continues a filled cache; "
                "start a new conversation (fresh cache) for each image prompt"
            )
        if kwargs.get("pixel_values") is not None:
            with self.run.model_work():  # the vision tower and projector (image stages' hooks count)
                features = self.run.family.image_features(kwargs)
            records = self.run.images.records
            if not self.run.family.packs_features and records:  # each image as its stages left it
                features.pooler_output = self.run.family.pooled([rec.state.hidden for rec in records])
            kwargs = {**kwargs, "pixel_values": None,
                      "mm_encoder_outputs": {**encoder_outputs, "image": features}}
            encoder_outputs = kwargs["mm_encoder_outputs"]
        images = self.run.images.take()
        if kwargs.get("pixel_values_videos") is not None and kwargs.get("mm_encoder_outputs"):
            # the model takes precomputed features for every modality or none: encode the videos its
            # own way (after the images' records are taken, so the image hooks' state is not theirs)
            with self.run.model_work():
                video = self.run.family.video_features(kwargs)
            encoder_outputs = {**kwargs["mm_encoder_outputs"], "video": video}
            kwargs = {**kwargs, "pixel_values_videos": None, "mm_encoder_outputs": encoder_outputs}
        return args, self._start(kwargs, images)

    def _start(self, kwargs: dict, images: list[ImageRecord]) -> dict:
        a = self.run.family
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        is_image = a.image_token_mask(ids, embeds)
        batch, length = is_image.shape
        mask2d = kwargs.get("attention_mask")
        real = (torch.ones(batch, length, dtype=torch.bool, device=is_image.device) if mask2d is None
                else mask2d.bool())
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
                torch.arange(length, device=is_image.device)[None] if pos is None else pos
            ).expand(batch, -1)[None]
            new_ids = rewritten_ids(orig, runs, [[images[j] for j in mine] for mine in per_sample], safe,
                                    present)
            shift = next_position(orig, real) - next_position(new_ids, padding)
            if mrope is not None:
                mrope = self._rewrite_mrope(kwargs, new_ids, safe, present, padding)
            else:
                kwargs["position_ids"] = new_ids[0]
            is_image = is_image.gather(1, safe) & present
        samples = self._samples(is_image, per_sample, images)
        self.run.trace_entries = [[] for _ in self.run.plan.stages]
        self.run.group_entries = [[] for _ in self.run.plan.stages]
        for si in range(len(self.run.images.input_stages) + len(self.run.images.output_stages)):
            for mine in per_sample:
                state = _sample_state([images[j].history[si] for j in mine], [images[j].crops for j in mine],
                                      is_image.device)
                self.run.trace_entries[si].append(state.index)
                self.run.group_entries[si].append(state.assign)
        self.run.kept = [[h.n for h in rec.history] for rec in images]
        self.run.scratch.clear()
        self.run.prefill = Prefill(
            batch=batch, length=new_len, padding=padding, source_columns=source, rewritten=rewritten,
            new_mask=new_mask, input_length=length, removed=removed, shift=shift, samples=samples,
            mrope=mrope,
        )
        self.run.image_tokens_per_layer = [int(samples[0].slots.numel())] * len(a.layers) if samples else []
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
        positions, _ = self.run.family.rope_index(ids, kwargs.get("mm_token_type_ids"),
                                               kwargs.get("image_grid_thw"), mask2d)
        return positions

    def _rewrite_mrope(
        self, kwargs: dict, new: Tensor, safe: Tensor, present: Tensor, padding: Tensor
    ) -> Tensor:
        """After a placeholder rewrite: the M-RoPE ids of the stages' position policies; the text row,
        which only orders the sequence, is renumbered; ``mm_token_type_ids`` shrinks with the prompt
        and the model's ``rope_deltas`` continue the new ids at decode steps."""
        new = new.masked_fill(~present[None], 0)
        text_row = (padding.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = torch.cat([text_row[None].to(new.dtype), new])
        types = kwargs.get("mm_token_type_ids")
        if types is not None:
            kwargs["mm_token_type_ids"] = types.gather(1, safe).masked_fill(~present, 0)
        self.run.family.base.rope_deltas = (next_position(new, padding) - padding.sum(1))[:, None]
        return new

    def _samples(
        self, is_image: Tensor, per_sample: list[list[int]], images: list[ImageRecord]
    ) -> list[Sample]:
        out = []
        for b, mine in enumerate(per_sample):
            slots = torch.nonzero(is_image[b]).flatten()
            runs = [images[j].layout() for j in mine]
            if any(r is not None for r in runs):  # separators are not image tokens for reducers
                tokens = torch.cat([~r if r is not None else torch.ones(images[j].state.n, dtype=torch.bool)
                                    for j, r in zip(mine, runs, strict=True)]).to(slots.device)
                slots = slots[tokens]
            meta = _sample_state([images[j].state for j in mine], [images[j].crops for j in mine],
                                 slots.device)
            vision = {name: torch.cat([images[j].vision[name] for j in mine])
                      for name in (images[mine[0]].vision if mine else {})}
            owners = [torch.full((images[j].crops,), i, dtype=torch.long) for i, j in enumerate(mine)]
            image_of_crop = torch.cat(owners).to(slots.device) if owners else slots.new_zeros(0)
            out.append(Sample(slots, meta, vision, image_of_crop))
        return out

    def _decode_kwargs(self, kwargs: dict, past: int) -> dict:
        p = self.run.prefill
        p.decoding = True
        if not p.rewritten:
            return kwargs
        mask = kwargs.get("attention_mask")
        q = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None
             else kwargs["inputs_embeds"]).shape[1]
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
            pos = (rows if pos.shape[0] == 3
                   else torch.cat([pos[:1] - p.removed.to(pos.device)[:, None], rows]))
        elif not self.run.family.mrope:  # the caller's numbering (or the model's own), moved to the prompt's
            if pos is None:
                pos = (past + torch.arange(q, device=shift.device))[None] + (p.input_length - p.length)
            pos = pos - shift
        # (M-RoPE without position ids: the model continues from rope_deltas, which the rewrite set)
        return {**kwargs, "position_ids": pos}


def _sample_state(states: list[TokenState], crops: list[int], device: Any) -> TokenState:
    """One sample's images as one state, without hidden states (they live in the sequence)."""
    states = [s.with_hidden(s.hidden[:, :0]) for s in states]
    return TokenState.concat(states, crops, device)
