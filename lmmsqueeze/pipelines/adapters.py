"""Model adapters: where a model family keeps its image tokens, projector, decoder layers and probes.

The runtime is written once against :class:`ModelAdapter`; a family only says where things are.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..compose.geometry import SUPPORTED_MODELS, ModelGeometry, geometry_from_config
from ..errors import ModelError
from ..reducers.base import VISION_SIGNALS, Grids
from .hooks import HookSet
from .probes import (
    VisionProbe,
    cls_hidden_probe,
    feature_layer_probe,
    last_layer_probe,
    mean_received_attention,
    vision_keys_fused,
)


@dataclass(frozen=True)
class PackedImage:
    """How a family that packs crops (LLaVA-NeXT) lays out one image's placeholder run.

    Attributes:
        source: ``[L]`` for each placeholder of the run, the index of its token among the image's
            crop features as the projector receives them (crop-major, ``crop * tokens_per_crop + t``),
            or -1 for a separator token (LLaVA-NeXT's newline), which is never an image token for
            reducers and is never dropped.
        crops: crops the vision tower encoded for this image.
        grids: ``(h, w)`` of every crop of the non-separator tokens, in run order.
        crop_ids: ``[n]`` crop (0..len(grids)-1) of each non-separator token.
    """

    source: Tensor
    crops: int
    grids: Grids
    crop_ids: Tensor

    @property
    def separators(self) -> Tensor:
        return self.source < 0


@dataclass
class ModelAdapter:
    """What the runtime needs to know about one loaded model.

    Attributes:
        model: the full model (e.g. ``LlavaForConditionalGeneration``).
        base: the multimodal base whose forward receives ``input_ids`` and image inputs.
        layers: the decoder layers.
        rotary: the decoder's rotary embedding (positions -> cos, sin).
        projector: the module mapping vision features to LLM embeddings (hooked for
            ``vision``/``projector`` placements).
        vision_attention: the self-attention of the vision feature layer, for [CLS] attention.
        features_have_cls: whether the features fed to the projector start with the [CLS] token.
        final_norm: the decoder's norm before the LM head (the ``normed_hidden`` signals).
        vision_layer: the vision layer whose output the projector reads (the ``cls_hidden`` signal).
        last_vision_attention: the self-attention of the vision tower's last layer (``last_*`` signals).
        image_token_id: id of the image placeholder token.
        pad_token_id: id used to left-pad rewritten prompts.
        geometry: shapes for the compiler.

    A family whose image features are packed after the projector (``packs_features``, e.g.
    LLaVA-NeXT's base crop + unpadded sub-crop grid + newline tokens) runs its pre-LLM stages on
    each image's packed features: :meth:`hook_packed_features` calls back with the packed features
    and their :class:`PackedImage` layouts.
    """

    packs_features: ClassVar[bool] = False
    #: positions are 3-D M-RoPE ids (temporal, height, width), Qwen2-VL style
    mrope: ClassVar[bool] = False

    model: nn.Module
    base: nn.Module
    layers: nn.ModuleList
    rotary: nn.Module
    projector: nn.Module
    vision_attention: nn.Module | None
    features_have_cls: bool
    image_token_id: int
    pad_token_id: int
    geometry: ModelGeometry
    final_norm: nn.Module | None = None  # the decoder's norm before the LM head
    vision_layer: nn.Module | None = None  # the vision layer whose output is the feature layer
    last_vision_attention: nn.Module | None = None  # the self-attention of the vision tower's last layer

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        """Run the vision tower and projector on the image inputs of a base-model call."""
        raise NotImplementedError

    def image_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """``[B, L]`` True where the prompt holds an image placeholder."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        emb = self.base.get_input_embeddings().weight[self.image_token_id]
        return (inputs_embeds == emb.to(inputs_embeds.dtype)).all(-1)

    def hook_packed_features(self, hooks: HookSet,
                             fn: Callable[[list[Tensor], list[PackedImage]], list[Tensor]]) -> None:
        """Install ``fn`` on the packed image features (only for ``packs_features`` families): this
        instance's ``get_image_features`` (which ``generate`` and ``forward`` both call) is wrapped so
        its per-image outputs go through ``fn`` with their layouts."""
        original = self.base.get_image_features

        @functools.wraps(original)
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            layouts = self.call_layouts(args, kwargs)
            if layouts is None or getattr(out, "pooler_output", None) is None:
                raise ModelError(f"{type(self.model).__name__} image features must be computed with return_dict=True "
                                 f"and {self.layout_inputs} while a pipeline is applied")
            out.pooler_output = fn(list(out.pooler_output), layouts)
            return out

        hooks.patch(self.base, "get_image_features", get_image_features)

    #: the ``get_image_features`` argument that layouts are read from (packing families)
    layout_inputs: ClassVar[str] = ""

    def call_layouts(self, args: tuple, kwargs: dict) -> list[PackedImage] | None:
        """The layouts of a ``get_image_features(pixel_values, <layout_inputs>, ...)`` call, or None."""
        raise NotImplementedError

    def count_image_tokens(self, inputs: Any) -> int:
        """Image tokens (for reducers and costs) in processor outputs: placeholders minus separators."""
        return int((inputs["input_ids"] == self.image_token_id).sum())

    def image_geometries(self, inputs: Any) -> list[ModelGeometry]:
        """The geometry of every image in processor outputs (its real token count and grids), for
        costs: families whose token count depends on the image size override this."""
        pixels = inputs.get("pixel_values")
        return [self.geometry] * (0 if pixels is None else int(pixels.shape[0]))

    def vision_probes(self, needs: set[str]) -> list[tuple[nn.Module, VisionProbe]]:
        """Forward hooks measuring the vision signals in ``needs`` (a CLIP-style tower whose first token
        is [CLS]): ``(module, probe)``, each probe returning ``{signal: [crops, tokens, ...]}`` (the
        [CLS] row included; ``cls_hidden``: ``[crops, 1, width]``)."""
        probes: list[tuple[nn.Module, VisionProbe]] = []
        if needs & {"cls_attention", "vision_keys"}:
            probes.append((self.vision_attention, functools.partial(feature_layer_probe, needs=needs)))
        if "cls_hidden" in needs:
            probes.append((self.vision_layer, cls_hidden_probe))
        if needs & {"last_cls_attention", "last_vision_keys"}:
            probes.append((self.last_vision_attention, functools.partial(last_layer_probe, needs=needs)))
        return probes

    # -- packing families: the projector's input rows and the per-image layouts index into them
    def projector_rows(self, features: Tensor) -> Tensor:
        """The projector input as ``[rows, tokens per row, width]``; a :class:`PackedImage`'s
        ``crops`` rows belong to it and its ``source`` indexes their flattened tokens."""
        return features

    def signal_rows(self, value: Tensor) -> Tensor:
        """A vision signal (as :meth:`vision_signals` measured it) laid out like :meth:`projector_rows`."""
        return value if self.features_have_cls else value[:, 1:]

    def project(self, hidden: Tensor) -> Tensor:
        """Project reduced projector-input tokens (``[n, width]``) to LLM embeddings, bypassing hooks."""
        return self.projector.forward(hidden)


@dataclass
class LlavaAdapter(ModelAdapter):
    """``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5 and its relatives)."""

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        kw = {k: base_kwargs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
              if base_kwargs.get(k) is not None}
        return self.base.get_image_features(pixel_values=base_kwargs["pixel_values"], return_dict=True, **kw)

    @classmethod
    def from_model(cls, model: nn.Module) -> "LlavaAdapter":
        return cls(**_llava_parts(model))


@dataclass
class LlavaNextAdapter(LlavaAdapter):
    """``transformers.LlavaNextForConditionalGeneration``: every image is a base crop plus sub-crops
    (anyres); ``get_image_features`` packs them as the base crop's grid, then the unpadded sub-crop
    grid with one ``image_newline`` token after each of its rows."""

    packs_features: ClassVar[bool] = True

    layout_inputs: ClassVar[str] = "image_sizes"

    def call_layouts(self, args: tuple, kwargs: dict) -> list[PackedImage] | None:
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        return None if sizes is None else self.layouts(sizes, strategy)

    def count_image_tokens(self, inputs: Any) -> int:
        return sum(g.image_tokens for g in self.image_geometries(inputs))  # newline separators are text

    def image_geometries(self, inputs: Any) -> list[ModelGeometry]:
        layouts = self.layouts(inputs["image_sizes"], self.model.config.vision_feature_select_strategy)
        return [dataclasses.replace(self.geometry, image_tokens=int((~lay.separators).sum()), grids=lay.grids,
                                    vision_crops=lay.crops) for lay in layouts]

    def layouts(self, image_sizes: Any, strategy: str) -> list[PackedImage]:
        """Each image's layout, found by packing index-valued stand-in features the model's own way."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        per_crop = side * side
        sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else [list(s) for s in image_sizes]
        counts = [image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                            patch_size=int(vision.image_size)) for s in sizes]
        fake = [torch.arange(k * per_crop, dtype=torch.float64).view(k, per_crop, 1) for k in counts]
        newline = torch.full((1,), -1.0, dtype=torch.float64)
        packed, _ = self.base.pack_image_features(fake, torch.tensor(sizes), strategy, image_newline=newline)
        out = []
        for k, run in zip(counts, packed):
            source = run[:, 0].round().long()
            rows = int((source < 0).sum())
            n = int((source >= 0).sum())
            if k > 1 and rows:
                cols = (n - per_crop) // rows
                grids: Grids = ((side, side), (rows, cols))
            else:
                grids = ((side, side),)
            crop_ids = torch.cat([torch.full((h * w,), c, dtype=torch.long) for c, (h, w) in enumerate(grids)])
            if crop_ids.numel() != n:
                raise ModelError(f"cannot read the LLaVA-NeXT layout of an image of size {sizes[len(out)]}")
            out.append(PackedImage(source, k, grids, crop_ids))
        return out


@dataclass
class QwenVLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

    The vision tower encodes every image of a call as one packed patch sequence; its 2x2 patch
    merger (the projector here) turns each aligned 2x2 block of patches (a "unit") into one LLM
    image token, and ``get_image_features`` splits the result per image (``image_grid_thw``). A
    ``vision`` stage reduces the units before the merger (its tokens are the four patches' features
    side by side); a ``projector`` stage reduces the merged tokens. Qwen2.5-VL runs its blocks on
    units in window order and restores raster order after the merger; layouts undo that order.

    Positions are 3-D M-RoPE ids: the runtime keeps every surviving token's original ids and passes
    them explicitly (see :mod:`.runtime`). The tower has no [CLS]: ``cls_attention`` is the mean
    attention each token receives in the last block (:func:`.probes.mean_received_attention`).
    """

    packs_features: ClassVar[bool] = True
    mrope: ClassVar[bool] = True

    @classmethod
    def from_model(cls, model: nn.Module) -> "QwenVLAdapter":
        config = model.config
        base = model.model
        visual = base.visual
        return cls(
            model=model, base=base, layers=base.language_model.layers, rotary=base.language_model.rotary_emb,
            projector=visual.merger, vision_attention=visual.blocks[-1].attn, features_have_cls=False,
            image_token_id=int(config.image_token_id), pad_token_id=_pad_token_id(config),
            geometry=geometry_from_config(config, name=getattr(config, "_name_or_path", "") or ""),
            final_norm=base.language_model.norm,
        )

    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        grid = base_kwargs.get("image_grid_thw")
        if grid is None:
            raise ModelError("Qwen2-VL image inputs need image_grid_thw; build them with the model's processor")
        return self.base.get_image_features(pixel_values=base_kwargs["pixel_values"], image_grid_thw=grid,
                                            return_dict=True)

    layout_inputs: ClassVar[str] = "image_grid_thw"

    def call_layouts(self, args: tuple, kwargs: dict) -> list[PackedImage] | None:
        grid = kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None)
        return None if grid is None else self.layouts(grid)

    def image_geometries(self, inputs: Any) -> list[ModelGeometry]:
        m = self.merge
        return [dataclasses.replace(self.geometry, image_tokens=(h // m) * (w // m), grids=((h // m, w // m),),
                                    vision_tokens=h * w) for _, h, w in inputs["image_grid_thw"].tolist()]

    def layouts(self, image_grid_thw: Tensor) -> list[PackedImage]:
        """Each image's merged grid; ``source`` maps its raster-order tokens to the merger's rows."""
        m = self.merge
        grids = image_grid_thw.tolist()
        order = self._raster_to_rows(image_grid_thw)
        out, start = [], 0
        for t, h, w in grids:
            if t != 1:
                raise ModelError(f"an image with image_grid_thw {[t, h, w]} has {t} frames; pipelines reduce "
                                 "single-frame images (videos are not supported)")
            n = (h // m) * (w // m)
            source = order[start:start + n] - start
            out.append(PackedImage(source, n, ((h // m, w // m),), torch.zeros(n, dtype=torch.long)))
            start += n
        return out

    def _raster_to_rows(self, image_grid_thw: Tensor) -> Tensor:
        """For every merged token in raster order (all images), its row in the merger's input."""
        visual = self.base.visual
        m = self.merge
        total = int((image_grid_thw.prod(-1) // (m * m)).sum())
        if not hasattr(visual, "window_size"):  # Qwen2-VL: no window reordering
            return torch.arange(total)
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(image_grid_thw.cpu(), spatial_merge_size=m,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return torch.argsort(window_index.cpu())

    def vision_probes(self, needs: set[str]) -> list[tuple[nn.Module, VisionProbe]]:
        """One hook on the last block (the tower has no [CLS] and nothing after its feature layer): the
        stand-ins ``cls_attention`` = ``last_cls_attention`` = the mean attention each token receives from
        its image's tokens, ``vision_keys`` (head-mean) and ``last_vision_keys`` (full width), each averaged
        over a merge unit's four patches."""
        if not needs & set(self.geometry.signals):
            return []
        return [(self.vision_attention, functools.partial(self._last_block_probe, needs=needs))]

    def _last_block_probe(self, attention: nn.Module, args: tuple, kwargs: dict, output: Any,
                          needs: set[str]) -> dict[str, Tensor]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        unit = self.merge * self.merge
        keys = vision_keys_fused(attention, hidden)  # read by every signal: projected once
        out = {}
        if needs & {"cls_attention", "last_cls_attention"}:
            received = mean_received_attention(attention, hidden, kwargs["cu_seqlens"],
                                               kwargs["position_embeddings"], keys).view(-1, unit).mean(1)
            out.update({name: received for name in needs & {"cls_attention", "last_cls_attention"}})
        if "vision_keys" in needs:
            heads = keys.view(keys.shape[0], attention.num_heads, -1).mean(1)
            out["vision_keys"] = heads.view(-1, unit, heads.shape[-1]).mean(1)
        if "last_vision_keys" in needs:
            out["last_vision_keys"] = keys.view(-1, unit, keys.shape[-1]).mean(1)
        return out

    def projector_rows(self, features: Tensor) -> Tensor:
        unit = self.merge * self.merge
        return features.reshape(-1, 1, unit * features.shape[-1])

    def signal_rows(self, value: Tensor) -> Tensor:
        return value.unsqueeze(1)

    def project(self, hidden: Tensor) -> Tensor:
        unit = self.merge * self.merge
        return self.projector.forward(hidden.reshape(-1, hidden.shape[-1] // unit))

    def rope_index(self, input_ids: Tensor, mm_token_type_ids: Tensor | None, image_grid_thw: Tensor | None,
                   attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The model's own 3-D positions ``[3, B, L]`` and rope deltas ``[B, 1]`` of a prompt."""
        if mm_token_type_ids is None or image_grid_thw is None:
            raise ModelError("a Qwen2-VL prompt with images needs mm_token_type_ids and image_grid_thw (or "
                             "explicit position_ids); build it with the model's processor")
        return self.base.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                        image_grid_thw=image_grid_thw, attention_mask=attention_mask)


def _pad_token_id(config: Any) -> int:
    """The id that left-pads rewritten prompts: the model's pad token, else its text model's, else 0."""
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config.get_text_config(), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _llava_parts(model: nn.Module) -> dict[str, Any]:
    """What LLaVA and LLaVA-NeXT share: module paths, the vision layers the probes read, ids, geometry."""
    config = model.config
    base = model.model
    vision_layer = last = None
    layer = config.vision_feature_layer
    tower = base.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)  # CLIPVisionModel(Transformer)
    if isinstance(layer, int) and encoder is not None:
        n = len(encoder.layers)
        idx = layer if layer >= 0 else n + 1 + layer  # hidden_states[idx] is the output of layers[idx-1]
        if 1 <= idx <= n:
            vision_layer = encoder.layers[idx - 1]
            last = encoder.layers[-1]
    geometry = geometry_from_config(config, name=getattr(config, "_name_or_path", "") or "")
    missing = set() if vision_layer is not None else VISION_SIGNALS
    if last is None:
        missing |= {"last_cls_attention", "last_vision_keys"}
    if missing & geometry.signals:
        geometry = dataclasses.replace(geometry, signals=geometry.signals - missing)
    return {
        "model": model,
        "base": base,
        "layers": base.language_model.layers,
        "rotary": base.language_model.rotary_emb,
        "projector": base.multi_modal_projector,
        "vision_attention": None if vision_layer is None else vision_layer.self_attn,
        "features_have_cls": config.vision_feature_select_strategy == "full",
        "image_token_id": int(config.image_token_id),
        "pad_token_id": _pad_token_id(config),
        "geometry": geometry,
        "final_norm": base.language_model.norm,
        "vision_layer": vision_layer,
        "last_vision_attention": None if last is None else last.self_attn,
    }


#: the adapter of every supported ``model_type`` (loaded with ``AutoModelForImageTextToText``)
ADAPTERS: dict[str, type[ModelAdapter]] = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter,
                                           "qwen2_vl": QwenVLAdapter, "qwen2_5_vl": QwenVLAdapter}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a loaded model; a :class:`ModelError` names what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = ADAPTERS.get(model_type)
    if family is not None and hasattr(model, "model") and hasattr(model.model, "language_model"):
        return family.from_model(model)
    raise ModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not supported; lmmsqueeze runs {SUPPORTED_MODELS}"
    )
