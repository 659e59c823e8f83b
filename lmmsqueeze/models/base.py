"""Model families: what the runtime and the compiler need to know about one family of transformers models.

A family is one class (one file in :mod:`lmmsqueeze.models`) registered with
:func:`register_family` for the ``model_type`` values it serves. It says where a loaded model keeps
its image tokens, projector, decoder layers and probes (an instance, :meth:`Family.from_model`),
and what shapes plans and costs depend on (:meth:`Family.read_geometry`, from the config alone). The
runtime is written once against :class:`Family`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn
from transformers import AutoConfig, AutoProcessor

from ..compose.geometry import ModelGeometry
from ..errors import ModelError, RegistryError
from ..reducers.base import LLM_SIGNALS, VISION_SIGNALS, Grids
from .probes import VisionProbe

#: every signal the runtime measures on a model whose vision tower has a [CLS] token
ALL_SIGNALS = LLM_SIGNALS | VISION_SIGNALS
#: what a vision tower without a [CLS] token cannot give
CLS_SIGNALS = frozenset({"cls_attention", "cls_hidden", "last_cls_attention"})

#: the ``Family`` class serving each ``model_type``
FAMILIES: dict[str, type[Family]] = {}
#: geometries of published models, for ``explain --model-config`` and cost tables
PRESETS: dict[str, ModelGeometry] = {}
#: the preset a geometry defaults to when none is given
DEFAULT_PRESET = "llava-1.5-7b"


@dataclass(frozen=True)
class PackedImage:
    """How a family that packs crops (LLaVA-NeXT, Qwen2-VL) lays out one image's placeholder run.

    Attributes:
        source: ``[L]`` for each placeholder of the run, the index of its token among the image's
            crop features as the projector receives them (crop-major, ``crop * tokens_per_crop + t``),
            or -1 for a separator token (LLaVA-NeXT's newline), which is never an image token for
            reducers and is never dropped.
        crops: crops the vision tower encoded for this image.
        grids: ``(h, w)`` of every crop of the non-separator tokens, in run order.
        crop_ids: ``[n]`` crop (0..len(grids)-1) of each non-separator token.
        pack: for an image whose tokens are blends of crop tokens (LLaVA-OneVision downsamples large
            sub-crop grids after the projector), how per-crop rows ``[crops, T, ...]`` become its packed
            tokens' rows, the model's way; None: each token has one source.
    """

    source: Tensor
    crops: int
    grids: Grids
    crop_ids: Tensor
    pack: Callable[[Tensor], Tensor] | None = None

    @property
    def mixed(self) -> bool:
        """Its tokens are blends of crop tokens (no single source each)."""
        return self.pack is not None

    @property
    def separators(self) -> Tensor:
        return self.source < 0


@dataclass
class Family:
    """One loaded model, as the runtime sees it.

    Attributes:
        model: the full model (e.g. ``LlavaForConditionalGeneration``).
        base: the multimodal base whose forward receives ``input_ids`` and image inputs.
        layers: the decoder layers.
        rotary: the decoder's rotary embedding (positions -> cos, sin).
        projector: the module mapping vision features to LLM embeddings (hooked for the pre-LLM
            placements).
        vision_attention: the self-attention of the vision feature layer, for [CLS] attention.
        features_have_cls: whether the features fed to the projector start with the [CLS] token.
        image_token_id: id of the image placeholder token.
        pad_token_id: id used to left-pad rewritten prompts.
        geometry: shapes for the compiler (:meth:`read_geometry` of the model's config).
        final_norm: the decoder's norm before the LM head (the ``normed_hidden`` signals).
        vision_layer: the vision layer whose output the projector reads (the ``cls_hidden`` signal).
        last_vision_attention: the self-attention of the vision tower's last layer (``last_*`` signals).

    A family whose image features are packed after the projector (``packs_features``, e.g.
    LLaVA-NeXT's base crop + unpadded sub-crop grid + newline tokens) runs its pre-LLM stages on
    each image's packed features: :meth:`hook_packed_features` calls back with the packed features
    and their :class:`PackedImage` layouts.
    """

    #: the ``model_type`` values this family serves
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the transformers class names it serves (for messages and the supported-models list)
    model_classes: ClassVar[tuple[str, ...]] = ()
    packs_features: ClassVar[bool] = False
    #: positions are 3-D M-RoPE ids (temporal, height, width), Qwen2-VL style
    mrope: ClassVar[bool] = False
    #: the ``get_image_features`` argument that layouts are read from (packing families)
    layout_inputs: ClassVar[str] = ""
    #: what a prompt holds for one image, when it is more than the processor's image token
    prompt_image: ClassVar[str | None] = None
    #: the transformers processor class, for :func:`image_only` when its video processor cannot load
    processor_class: ClassVar[type | None] = None

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
    final_norm: nn.Module | None = None
    vision_layer: nn.Module | None = None
    last_vision_attention: nn.Module | None = None

    # -- from the config alone
    @classmethod
    def read_geometry(cls, config: Any, name: str = "") -> ModelGeometry:
        """The shapes of a model of this family, read from its transformers config."""
        raise NotImplementedError

    @classmethod
    def from_model(cls, model: nn.Module) -> Family:
        raise NotImplementedError

    @classmethod
    def load_processor(cls, path: Path) -> Any:
        """The processor of a model directory (offline); when it cannot be built here because its
        video processor needs torchvision, the family's processor class without it
        (:func:`image_only`)."""
        try:
            return AutoProcessor.from_pretrained(path, local_files_only=True)
        except (ImportError, AttributeError, ValueError, TypeError, OSError):  # OSError: no video processor
            if cls.processor_class is None:
                raise
            return image_only(cls.processor_class).from_pretrained(path, local_files_only=True)

    # -- a loaded model
    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        """Run the vision tower and projector on the image inputs of a base-model call."""
        raise NotImplementedError

    #: inputs of a base-model call that ``get_video_features`` takes besides the frames
    video_inputs: ClassVar[tuple[str, ...]] = ()

    def video_features(self, base_kwargs: dict[str, Any]) -> Any:
        """The model's own video features of a base-model call (its ``pixel_values_videos``): a prefill
        hands the model its image features precomputed, and a model that takes precomputed features
        takes them for every modality. Videos are left as the model encodes them."""
        extra = {k: base_kwargs[k] for k in self.video_inputs if base_kwargs.get(k) is not None}
        return self.base.get_video_features(base_kwargs["pixel_values_videos"], return_dict=True, **extra)

    def image_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """``[B, L]`` True where the prompt holds an image placeholder."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        emb = self.base.get_input_embeddings().weight[self.image_token_id]
        return (inputs_embeds == emb.to(inputs_embeds.dtype)).all(-1)

    def hook_packed_features(self, hooks: Any, fn: Callable[[list[Tensor], list[PackedImage]],
                                                            tuple[list[Tensor], list[Tensor]]]) -> None:
        """Install ``fn`` on the packed image features (only for ``packs_features`` families): this
        instance's ``get_image_features`` (which ``generate`` and ``forward`` both call) is wrapped,
        through ``hooks`` (a :class:`~lmmsqueeze.runtime.hooks.HookSet`), so its per-image outputs go
        through ``fn`` with their layouts. ``fn`` returns the new features and, per image, the output
        token each original token went to (``-1``: dropped), which :meth:`follow_groups` applies to
        whatever else the family's features carry."""
        original = self.base.get_image_features

        @functools.wraps(original)
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            layouts = self.call_layouts(args, kwargs)
            if layouts is None or getattr(out, "pooler_output", None) is None:
                raise ModelError(f"{type(self.model).__name__} image features must be computed with "
                                 f"return_dict=True and {self.layout_inputs} while a pipeline is applied")
            out.pooler_output, groups = fn(list(out.pooler_output), layouts)
            self.follow_groups(out, groups)
            return out

        hooks.patch(self.base, "get_image_features", get_image_features)

    def follow_groups(self, out: Any, groups: list[Tensor]) -> None:
        """Reduce what else ``get_image_features`` returned per image token (e.g. Qwen3-VL's DeepStack
        features) as the image tokens were: ``groups[i][t]`` is the output token of image ``i``'s
        original token ``t`` (-1: dropped)."""

    def install(self, run: Any, hooks: Any) -> None:
        """Hooks the family needs beyond the runtime's own, installed with every non-vanilla plan (e.g.
        Qwen3-VL's DeepStack additions follow an ``llm`` stage's shorter sequence)."""

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
        """Forward hooks measuring the vision signals in ``needs``: ``(module, probe)``, each probe
        returning ``{signal: [crops, tokens, ...]}``."""
        return []

    # -- packing families: the projector's input rows and the per-image layouts index into them
    def projector_rows(self, features: Tensor) -> Tensor:
        """The projector input as ``[rows, tokens per row, width]``; a :class:`PackedImage`'s
        ``crops`` rows belong to it and its ``source`` indexes their flattened tokens."""
        return features

    def pooled(self, features: list[Tensor]) -> Any:
        """Each image's features (as the pipeline left them) in the form the model's forward takes as
        ``pooler_output``: a list per image by default."""
        return features

    def gather_rows(self, rows: Tensor, layout: PackedImage) -> Tensor:
        """An image's per-crop rows (``[crops, T, ...]``, laid out like :meth:`projector_rows`) as rows of
        its packed non-separator tokens, in run order."""
        if layout.pack is not None:
            return layout.pack(rows)
        return rows.flatten(0, 1)[layout.source[~layout.separators].to(rows.device)]

    def signal_rows(self, value: Tensor) -> Tensor:
        """A vision signal (as :meth:`vision_probes` measured it) laid out like :meth:`projector_rows`."""
        return value if self.features_have_cls else value[:, 1:]

    def project(self, hidden: Tensor) -> Tensor:
        """Project reduced projector-input tokens (``[n, width]``) to LLM embeddings, bypassing hooks."""
        return self.projector.forward(hidden)

    def rope_index(self, input_ids: Tensor, mm_token_type_ids: Tensor | None, image_grid_thw: Tensor | None,
                   attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The model's own 3-D positions ``[3, B, L]`` and rope deltas ``[B, 1]`` (M-RoPE families)."""
        raise NotImplementedError


@functools.cache
def image_only(processor_class: type) -> type:
    """``processor_class`` (a transformers multimodal processor) without its video processor: the same
    class and ``__call__`` for images and text, built from an image processor and a tokenizer only.
    Without torchvision (which lmmsqueeze never installs) the video processor cannot be built, and
    ``ProcessorMixin`` refuses a processor that lacks it."""

    class ImageOnly(processor_class):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any):
            super().__init__(image_processor, tokenizer, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__  # saves as the real class
    ImageOnly.__doc__ = processor_class.__doc__
    return ImageOnly


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: serve ``cls.model_types`` with ``cls``; a type served twice is refused."""
    if not cls.model_types:
        raise RegistryError(
            f"{cls.__name__} names no model_types; set model_types = ('<config model_type>',)"
        )
    for model_type in cls.model_types:
        if model_type in FAMILIES and FAMILIES[model_type] is not cls:
            raise RegistryError(f"model_type {model_type!r} is served by {FAMILIES[model_type].__name__} "
                                "already; a family serves each model_type once")
        FAMILIES[model_type] = cls
    return cls


def register_preset(name: str, geometry: ModelGeometry) -> None:
    """Name a published model's geometry (``explain --model-config NAME``)."""
    if name in PRESETS and PRESETS[name] != geometry:
        raise RegistryError(f"preset {name!r} is registered already with another geometry; pick another name")
    PRESETS[name] = geometry


def supported_models() -> str:
    """The transformers classes lmmsqueeze runs, as one phrase."""
    names = list(dict.fromkeys(n for cls in FAMILIES.values() for n in cls.model_classes))
    return ", ".join(names[:-1]) + (f" and {names[-1]}" if len(names) > 1 else "".join(names))


def family_class(model_type: str | None) -> type[Family]:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ModelError(
            f"model type {model_type!r} is not supported; lmmsqueeze runs {supported_models()}"
        ) from None


def family_for(model: nn.Module) -> Family:
    """The family view of a loaded model; a :class:`ModelError` names what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = FAMILIES.get(model_type)
    if cls is not None and hasattr(model, "model") and hasattr(model.model, "language_model"):
        return cls.from_model(model)
    raise ModelError(f"{type(model).__name__} (model_type={model_type!r}) is not supported; lmmsqueeze runs "
                     f"{supported_models()}")


def pad_token_id(config: Any) -> int:
    """The id that left-pads rewritten prompts: the model's pad token, else its text model's, else 0."""
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config.get_text_config(), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def config_name(config: Any, default: str = "") -> str:
    return getattr(config, "_name_or_path", "") or default


def geometry_from_config(config: Any, name: str = "") -> ModelGeometry:
    """The geometry of a transformers multimodal config, read by its family."""
    return family_class(getattr(config, "model_type", None)).read_geometry(config, name)


def geometry_from_path(path: str | Path) -> ModelGeometry:
    """Geometry from a model directory or its ``config.json``, without loading weights."""
    p = Path(path)
    directory = p.parent if p.is_file() else p
    if not (directory / "config.json").is_file():
        raise ModelError(f"{str(p)!r} is neither a model directory with a config.json nor a config.json file")
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"cannot read the config in {str(directory)!r}: {str(exc).splitlines()[0]}"
        ) from None
    return geometry_from_config(config, name=str(path))


def preset(name: str) -> ModelGeometry:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model config {name!r}; presets: {', '.join(sorted(PRESETS))}") from None


def geometry_of(model_or_config: Any) -> ModelGeometry:
    """The one way to a geometry: from a loaded model (its family), a transformers config, a
    :class:`ModelGeometry`, a preset name, or None (the LLaVA-1.5-7B preset)."""
    if model_or_config is None:
        return preset(DEFAULT_PRESET)
    if isinstance(model_or_config, ModelGeometry):
        return model_or_config
    if isinstance(model_or_config, str):
        return preset(model_or_config)
    if isinstance(model_or_config, nn.Module):
        return family_for(model_or_config).geometry
    return geometry_from_config(model_or_config, name=config_name(model_or_config))


def without_signals(geometry: ModelGeometry, missing: frozenset[str] | set[str]) -> ModelGeometry:
    """The geometry minus signals this model cannot give."""
    if not missing & geometry.signals:
        return geometry
    return dataclasses.replace(geometry, signals=geometry.signals - missing)


#: Decoder shapes of published backbones: (layers, hidden, heads, kv heads, ffn, vocab).
DECODERS = {
    "vicuna-7b": (32, 4096, 32, 32, 11008, 32000),
    "vicuna-13b": (40, 5120, 40, 40, 13824, 32000),
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256),
    "qwen2-7b": (28, 3584, 28, 4, 18944, 152064),
    "phi3-mini": (32, 3072, 32, 32, 8192, 32064),
}


def decoder_shapes(decoder: str, vocab: int | None = None) -> dict[str, Any]:
    """The :class:`ModelGeometry` fields of a published decoder (see :data:`DECODERS`)."""
    layers, hidden, heads, kv, ffn, voc = DECODERS[decoder]
    return dict(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                head_dim=hidden // heads, intermediate_size=ffn, vocab_size=vocab or voc, gated_ffn=True)
