"""Model geometry: what the compiler needs to know about a model, read from its config (no weights)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..reducers.base import LLM_SIGNALS, VISION_SIGNALS, Grids


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
    vision_hidden_size: int = 0  # width of the vision feature layer
    vision_heads: int = 1  # attention heads of the vision tower (head-mean keys are vision_hidden_size / heads wide)
    vision_tokens: int = 0  # tokens per crop in the vision tower, [CLS] included
    vision_crops: int = 1  # crops the vision tower encodes per image (LLaVA-NeXT: base + sub-crops)
    vision_merge: int = 1  # vision-tower tokens per LLM image token (Qwen2-VL's 2x2 patch merger: 4)
    cls_attention: str = "cls"  # what the cls_attention signal is: "cls" ([CLS] query) or "mean" (no [CLS]:
    # the mean attention each token receives from every token of its image)


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


#: every signal the runtime measures on a LLaVA-style model with a CLIP tower read before its last layer
LLAVA_SIGNALS = LLM_SIGNALS | VISION_SIGNALS
#: what a vision tower without a [CLS] token cannot give
CLS_SIGNALS = frozenset({"cls_attention", "cls_hidden", "last_cls_attention"})

SUPPORTED_MODELS = ("LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
                    "Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration")

#: the image the plan of a Qwen2-VL-family model assumes (the runtime uses every image's own grid):
#: 24x24 merged tokens, a 672 px square at patch 14 with a 2x2 merger
QWEN_REFERENCE_GRID = (24, 24)


def geometry_from_config(config: Any, name: str = "") -> ModelGeometry:
    """Geometry of a transformers multimodal config (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llava_next":
        return _llava_next_geometry(config, name)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_vl_geometry(config, name)
    if model_type != "llava":
        raise ModelError(f"model type {model_type!r} is not supported yet; lmmsqueeze runs {SUPPORTED_MODELS}")
    geometry, side, has_cls = _clip_llava_geometry(config, name, "llava")
    if getattr(config, "vision_feature_select_strategy", "default") == "full":  # the features keep [CLS]
        return dataclasses.replace(geometry, image_tokens=side * side + (1 if has_cls else 0),
                                   grids=None if has_cls else geometry.grids)
    return geometry


def _clip_llava_geometry(config: Any, name: str, default_name: str) -> tuple[ModelGeometry, int, bool]:
    """A LLaVA-style model with a ViT tower (a [CLS] token when it is CLIP): one ``side x side``
    grid per crop. Returns the geometry, the side and whether the tower has [CLS]."""
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    has_cls = getattr(vision, "model_type", "") == "clip_vision_model"
    signals = LLAVA_SIGNALS if has_cls else LLAVA_SIGNALS - CLS_SIGNALS
    geometry = ModelGeometry(
        name=name or getattr(config, "_name_or_path", "") or default_name,
        family=config.model_type,
        image_tokens=side * side,
        grids=((side, side),),
        signals=signals,
        vision_hidden_size=int(vision.hidden_size),
        vision_heads=int(getattr(vision, "num_attention_heads", 1)),
        vision_tokens=side * side + (1 if has_cls else 0),
        **text_geometry(config.get_text_config()),
    )
    return geometry, side, has_cls


def _llava_next_geometry(config: Any, name: str) -> ModelGeometry:
    """LLaVA-NeXT: a base crop plus the unpadded grid of sub-crops (a newline token after each of its
    rows, which counts as text). The plan assumes a square image on a 2x2 crop grid, i.e. 5 crops:
    the base ``s x s`` grid and a ``2s x 2s`` sub-crop grid; at run time the real grids come from
    each image's size."""
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        raise ModelError("LLaVA-NeXT with vision_feature_select_strategy='full' is not supported; use 'default'")
    geometry, side, _ = _clip_llava_geometry(config, name, "llava-next")
    return dataclasses.replace(geometry, image_tokens=5 * side * side, grids=((side, side), (2 * side, 2 * side)),
                               vision_crops=5)


def _qwen_vl_geometry(config: Any, name: str) -> ModelGeometry:
    """Qwen2-VL / Qwen2.5-VL: image tokens are the 2x2-merged patch grid of each image (its size comes
    from ``image_grid_thw`` at run time; the plan assumes :data:`QWEN_REFERENCE_GRID`). The vision
    tower has no [CLS] token: ``cls_attention`` is the mean attention each token receives in the
    tower's last block."""
    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    h, w = QWEN_REFERENCE_GRID
    width = int(getattr(vision, "embed_dim", 0) or 0) if config.model_type == "qwen2_vl" else int(vision.hidden_size)
    return ModelGeometry(
        name=name or getattr(config, "_name_or_path", "") or config.model_type.replace("_", "-"),
        family=config.model_type,
        image_tokens=h * w,
        grids=((h, w),),
        signals=LLAVA_SIGNALS - {"cls_hidden"},
        vision_hidden_size=width,
        vision_heads=int(vision.num_heads),
        vision_tokens=h * w * merge * merge,
        vision_merge=merge * merge,
        cls_attention="mean",
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



#: Decoder shapes of published backbones: (layers, hidden, heads, kv heads, ffn, vocab).
_DECODERS = {
    "vicuna-7b": (32, 4096, 32, 32, 11008, 32000),
    "vicuna-13b": (40, 5120, 40, 40, 13824, 32000),
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256),
    "qwen2-7b": (28, 3584, 28, 4, 18944, 152064),
    "phi3-mini": (32, 3072, 32, 32, 8192, 32064),
}


def _clip_l336_llava(name: str, decoder: str, vocab: int | None = None) -> ModelGeometry:
    layers, hidden, heads, kv, ffn, voc = _DECODERS[decoder]
    return ModelGeometry(
        name=name, family="llava", num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
        head_dim=hidden // heads, intermediate_size=ffn, vocab_size=vocab or voc, gated_ffn=True,
        image_tokens=576, grids=((24, 24),), signals=LLAVA_SIGNALS, vision_hidden_size=1024, vision_heads=16,
        vision_tokens=577,
    )


def _clip_l336_llava_next(name: str, decoder: str, vocab: int | None = None) -> ModelGeometry:
    """LLaVA-NeXT (anyres): a square image on a 2x2 crop grid, 5 crops x 576 = 2880 image tokens (the
    base 24x24 crop and the 48x48 sub-crop grid; its 48 newline tokens count as text)."""
    return dataclasses.replace(_clip_l336_llava(name, decoder, vocab), family="llava_next", image_tokens=2880,
                               grids=((24, 24), (48, 48)), vision_crops=5)


#: Built-in geometries of published backbones (CLIP ViT-L/14-336, 576 tokens per crop), for
#: `explain --model-config` and cost tables.
def _qwen2_vl(name: str) -> ModelGeometry:
    """Qwen2-VL-7B: the Qwen2-7B decoder behind a 1280-wide ViT (patch 14) whose 2x2 patch merger gives
    the LLM's image tokens; a 672 px square image is a 48x48 patch grid, 24x24 = 576 image tokens. The
    tower has no [CLS] token: [CLS]-attention reducers read the mean attention each token receives."""
    layers, hidden, heads, kv, ffn, voc = _DECODERS["qwen2-7b"]
    return ModelGeometry(
        name=name, family="qwen2_vl", num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
        head_dim=hidden // heads, intermediate_size=ffn, vocab_size=voc, gated_ffn=True, image_tokens=576,
        grids=((24, 24),), signals=LLAVA_SIGNALS - {"cls_hidden"}, vision_hidden_size=1280, vision_heads=16,
        vision_tokens=2304, vision_merge=4, cls_attention="mean",
    )


PRESETS: dict[str, ModelGeometry] = {
    "llava-1.5-7b": _clip_l336_llava("llava-1.5-7b", "vicuna-7b", vocab=32064),
    "llava-1.5-13b": _clip_l336_llava("llava-1.5-13b", "vicuna-13b", vocab=32064),
    "llava-next-7b": _clip_l336_llava_next("llava-next-7b", "vicuna-7b", vocab=32064),
    "qwen2-vl-7b": _qwen2_vl("qwen2-vl-7b"),
    # Qwen2.5-VL-7B: the same decoder shapes and merged grid; its windowed ViT is also 1280 wide
    "qwen2.5-vl-7b": dataclasses.replace(_qwen2_vl("qwen2.5-vl-7b"), family="qwen2_5_vl"),
    **{name: _clip_l336_llava(name, name) for name in _DECODERS},
}


def with_tokens(geometry: ModelGeometry, vision_tokens: int) -> ModelGeometry:
    """The geometry with ``vision_tokens`` image tokens per image (a multiple of a crop keeps the grid)."""
    if isinstance(vision_tokens, bool) or not isinstance(vision_tokens, int) or vision_tokens < 1:
        raise ModelError(f"--vision-tokens {vision_tokens} must be a positive integer, e.g. 576")
    crop = geometry.grids[0] if geometry.grids else None
    per_crop = crop[0] * crop[1] if crop else 0
    grids = (crop,) * (vision_tokens // per_crop) if per_crop and vision_tokens % per_crop == 0 else None
    return dataclasses.replace(geometry, image_tokens=vision_tokens, grids=grids)


def preset(name: str) -> ModelGeometry:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model config {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
