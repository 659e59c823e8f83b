"""Model geometry: what the compiler needs to know about a model, read from its config (no weights)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..reducers.base import Grids


@dataclass(frozen=True)
class ModelGeometry:
    """Shapes of a LLaVA-style model that plans and costs depend on."""

    name: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_ffn: bool
    image_tokens: int  # per image, as the LLM receives them
    grids: Grids  # (h, w) per crop of one image; None when the features are not a grid
    signals: frozenset[str]  # signals the runtime can measure on this model

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["signals"] = sorted(self.signals)
        d["grids"] = [list(g) for g in self.grids] if self.grids else None
        return d


#: decoder families whose FFN is a plain two-matrix MLP (all others here use gate/up/down)
PLAIN_FFN_TYPES = ("gpt2", "opt", "gpt_neox", "phi")


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None) if not isinstance(cfg, dict) else cfg.get(n)
        if v is not None:
            return v
    return default


def text_geometry(text_cfg: Any) -> dict[str, Any]:
    """Decoder shapes from a text config (an object or a dict)."""
    hidden = _get(text_cfg, "hidden_size", "n_embd")
    heads = _get(text_cfg, "num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise ModelError("the text config has no hidden_size / num_attention_heads; is this a decoder config?")
    return dict(
        num_layers=int(_get(text_cfg, "num_hidden_layers", "n_layer")),
        hidden_size=int(hidden),
        num_heads=int(heads),
        num_kv_heads=int(_get(text_cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_get(text_cfg, "head_dim", default=hidden // heads)),
        intermediate_size=int(_get(text_cfg, "intermediate_size", default=4 * hidden)),
        vocab_size=int(_get(text_cfg, "vocab_size", default=0)),
        gated_ffn=_get(text_cfg, "model_type") not in PLAIN_FFN_TYPES,
    )


def geometry_from_config(config: Any, name: str = "") -> ModelGeometry:
    """Geometry of a transformers multimodal config (LLaVA family)."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llava":
        raise ModelError(
            f"model type {model_type!r} is not supported yet; lmmsqueeze runs LlavaForConditionalGeneration models"
        )
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    has_cls = getattr(vision, "model_type", "") == "clip_vision_model"
    if strategy == "full":
        tokens, grids = side * side + (1 if has_cls else 0), (None if has_cls else ((side, side),))
    else:
        tokens, grids = side * side, ((side, side),)
    signals = {"text_attention", "text_image_attention", "llm_keys", "vision_keys"}
    if has_cls:
        signals.add("cls_attention")
    return ModelGeometry(
        name=name or getattr(config, "_name_or_path", "") or "llava",
        family="llava",
        image_tokens=tokens,
        grids=grids,
        signals=frozenset(signals),
        **text_geometry(config.get_text_config()),
    )


def geometry_from_path(path: str | Path) -> ModelGeometry:
    """Geometry from a model directory or its ``config.json``, without loading weights."""
    from transformers import AutoConfig

    p = Path(path)
    directory = p.parent if p.is_file() else p
    if not (directory / "config.json").is_file():
        raise ModelError(f"{str(p)!r} is neither a model directory with a config.json nor a config.json file")
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read the config in {str(directory)!r}: {str(exc).splitlines()[0]}") from None
    return geometry_from_config(config, name=str(path))


LLAVA_SIGNALS = frozenset({"text_attention", "text_image_attention", "llm_keys", "cls_attention", "vision_keys"})

#: Built-in geometries of published backbones, for `explain --model-config` and cost tables.
PRESETS: dict[str, ModelGeometry] = {
    "llava-1.5-7b": ModelGeometry(
        name="llava-1.5-7b", family="llava", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
        head_dim=128, intermediate_size=11008, vocab_size=32064, gated_ffn=True, image_tokens=576,
        grids=((24, 24),), signals=LLAVA_SIGNALS,
    ),
    "llava-1.5-13b": ModelGeometry(
        name="llava-1.5-13b", family="llava", num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40,
        head_dim=128, intermediate_size=13824, vocab_size=32064, gated_ffn=True, image_tokens=576,
        grids=((24, 24),), signals=LLAVA_SIGNALS,
    ),
}


def preset(name: str) -> ModelGeometry:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model config {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
