"""Model adapters: where a model family keeps its image tokens, projector, decoder layers and probes.

The runtime is written once against :class:`ModelAdapter`; a family only says where things are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..compose.geometry import ModelGeometry, geometry_from_config
from ..errors import ModelError


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
        image_token_id: id of the image placeholder token.
        pad_token_id: id used to left-pad rewritten prompts.
        geometry: shapes for the compiler.
    """

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

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        """Run the vision tower and projector on the image inputs of a base-model call."""
        raise NotImplementedError

    def image_token_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """``[B, L]`` True where the prompt holds an image placeholder."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        emb = self.base.get_input_embeddings().weight[self.image_token_id]
        return (inputs_embeds == emb.to(inputs_embeds.dtype)).all(-1)


@dataclass
class LlavaAdapter(ModelAdapter):
    """``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5 and its relatives)."""

    def image_features(self, base_kwargs: dict[str, Any]) -> Any:
        kw = {k: base_kwargs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
              if base_kwargs.get(k) is not None}
        return self.base.get_image_features(pixel_values=base_kwargs["pixel_values"], return_dict=True, **kw)

    @classmethod
    def from_model(cls, model: nn.Module) -> "LlavaAdapter":
        config = model.config
        base = model.model
        vision_attention = None
        layer = config.vision_feature_layer
        tower = base.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)  # CLIPVisionModel(Transformer)
        if isinstance(layer, int) and encoder is not None:
            n = len(encoder.layers)
            idx = layer if layer >= 0 else n + 1 + layer  # hidden_states[idx] is the output of layers[idx-1]
            if 1 <= idx <= n:
                vision_attention = encoder.layers[idx - 1].self_attn
        geometry = geometry_from_config(config, name=getattr(config, "_name_or_path", "") or "llava")
        if vision_attention is None:
            geometry = ModelGeometry(**{**geometry.__dict__, "signals": geometry.signals - {"cls_attention", "vision_keys"}})
        text = config.get_text_config()
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = getattr(text, "pad_token_id", None)
        return cls(
            model=model,
            base=base,
            layers=base.language_model.layers,
            rotary=base.language_model.rotary_emb,
            projector=base.multi_modal_projector,
            vision_attention=vision_attention,
            features_have_cls=config.vision_feature_select_strategy == "full",
            image_token_id=int(config.image_token_id),
            pad_token_id=int(pad) if pad is not None else 0,
            geometry=geometry,
        )


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a loaded model; a :class:`ModelError` names what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "llava" and hasattr(model, "model") and hasattr(model.model, "language_model"):
        return LlavaAdapter.from_model(model)
    raise ModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not supported; "
        "lmmsqueeze runs transformers.LlavaForConditionalGeneration models"
    )
