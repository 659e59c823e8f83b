"""Model geometry: what the compiler needs to know about a model (families read it from their configs:
:mod:`lmmsqueeze.models`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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
    vision_hidden_size: int = 0  # width of the vision feature layer
    # attention heads of the vision tower (head-mean keys are vision_hidden_size / heads wide)
    vision_heads: int = 1
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
        raise ModelError("the text config has no hidden_size / num_attention_heads; "
                         "is this a decoder config?")
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


def with_tokens(geometry: ModelGeometry, vision_tokens: int) -> ModelGeometry:
    """The geometry with ``vision_tokens`` image tokens per image (a multiple of a crop keeps the grid)."""
    if isinstance(vision_tokens, bool) or not isinstance(vision_tokens, int) or vision_tokens < 1:
        raise ModelError(f"--vision-tokens {vision_tokens} must be a positive integer, e.g. 576")
    crop = geometry.grids[0] if geometry.grids else None
    per_crop = crop[0] * crop[1] if crop else 0
    grids = (crop,) * (vision_tokens // per_crop) if per_crop and vision_tokens % per_crop == 0 else None
    return dataclasses.replace(geometry, image_tokens=vision_tokens, grids=grids)
