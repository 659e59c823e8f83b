"""Vision-tower probes: forward-hook bodies that measure a family's vision signals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import cls_query_attention, crop_received_attention, vision_projection

#: a forward hook's body that measures vision signals: ``(module, args, kwargs, output) -> {signal: tensor}``
VisionProbe = Callable[[nn.Module, tuple, dict, Any], dict[str, Tensor]]


def _input(args: tuple, kwargs: dict) -> Tensor:
    return kwargs.get("hidden_states", args[0] if args else None)


def feature_layer_probe(
    attn: nn.Module, args: tuple, kwargs: dict, output: Any, needs: set[str]
) -> dict[str, Tensor]:
    """At the feature layer's self-attention (CLIP-style, [CLS] first): ``cls_attention`` (head-mean
    [CLS] row, ``[B, T]``) and ``vision_keys`` (keys averaged over heads, ``[B, T, head_dim]``); the
    keys are projected once for both."""
    hidden = _input(args, kwargs)
    keys = vision_projection(attn, "k", hidden)
    out = {}
    if "cls_attention" in needs:
        out["cls_attention"] = cls_query_attention(attn, hidden, keys)
    if "vision_keys" in needs:
        b, t, _ = keys.shape
        out["vision_keys"] = keys.view(b, t, -1, attn.head_dim).mean(2)
    return out


def cls_hidden_probe(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> dict[str, Tensor]:
    """At the vision layer that produces the features: the [CLS] token's feature, ``[B, 1, width]``."""
    hidden = output[0] if isinstance(output, tuple) else output
    return {"cls_hidden": hidden[:, :1]}


def last_layer_probe(
    attn: nn.Module, args: tuple, kwargs: dict, output: Any, needs: set[str]
) -> dict[str, Tensor]:
    """At the self-attention of the vision tower's last layer: its q and k projections as one
    full-width head, ``last_cls_attention`` = softmax over every token of ``q_cls . k / sqrt(width)``
    (``[B, T]``) and ``last_vision_keys`` (``[B, T, width]``)."""
    hidden = _input(args, kwargs)
    keys = vision_projection(attn, "k", hidden)
    out = {}
    if "last_cls_attention" in needs:
        q = vision_projection(attn, "q", hidden[:, :1])
        logits = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * keys.shape[-1] ** -0.5
        out["last_cls_attention"] = logits.softmax(dim=-1)[:, 0]
    if "last_vision_keys" in needs:
        out["last_vision_keys"] = keys
    return out


def received_attention_probe(attn: nn.Module, args: tuple, kwargs: dict, output: Any,
                             needs: set[str]) -> dict[str, Tensor]:
    """At the self-attention of a tower without [CLS] whose feature layer is its last (SigLIP in
    LLaVA-OneVision): the stand-ins ``cls_attention`` = ``last_cls_attention`` = the mean attention each
    token receives from its crop's tokens (``[crops, T]``), ``vision_keys`` (head-mean, ``[crops, T,
    head_dim]``) and ``last_vision_keys`` (full width); the keys are projected once."""
    hidden = _input(args, kwargs)
    keys = vision_projection(attn, "k", hidden)
    out: dict[str, Tensor] = {}
    if needs & {"cls_attention", "last_cls_attention"}:
        received = crop_received_attention(attn, hidden, keys)
        out.update({name: received for name in needs & {"cls_attention", "last_cls_attention"}})
    if "vision_keys" in needs:
        b, t, _ = keys.shape
        out["vision_keys"] = keys.view(b, t, -1, attn.head_dim).mean(2)
    if "last_vision_keys" in needs:
        out["last_vision_keys"] = keys
    return out
