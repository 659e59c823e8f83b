"""Decoder-side signals of an ``llm`` stage at layer K: one-query probes of layer K-1, readings of the
stage's input, and the relevance of the text to the image at the decoder input.

Every value is indexed by the columns of the current sequence (``[B, L, ...]``), except the rows of
text-to-image attention (one ``[T, L]`` per sample, T = the prompt tokens after its last image
token); :func:`stage_signals` cuts each reducer's rows out of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..attention import apply_rope, decoder_heads, last_query_attention, projected_heads, rows_attention
from ..reducers.base import Signals


def _wide(x: Tensor) -> Tensor:
    """At least float32 (double precision models keep theirs)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def post_rope_keys(attn: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """``[B, KV, L, head_dim]`` a layer's keys after RoPE, as its cache holds them."""
    return apply_rope(decoder_heads(attn, "k", hidden), *rope)


def cached_keys(cache: Any, layer: int, length: int) -> Tensor | None:
    """The post-RoPE keys layer ``layer`` just wrote to ``cache`` (``[B, KV, length, head_dim]``), when the
    cache holds exactly this prefill's ``length`` columns (a fresh dynamic cache); else None."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers):
        return None
    keys = getattr(layers[layer], "keys", None)
    if not isinstance(keys, Tensor) or keys.dim() != 4 or keys.shape[-2] != length:
        return None
    return keys


def previous_layer_signals(attn: nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor], padding: Tensor,
                           text: list[Tensor], needs: frozenset[str], keys: Tensor | None = None
                           ) -> dict[str, Any]:
    """Measured at layer K-1's self-attention from its (normed) input: ``text_attention`` ``[B, L]``,
    post-RoPE ``keys`` ``[B, L, d_kv]`` (for ``llm_keys`` and ``text_keys``) and ``text_image_attention``
    (the rows of each sample's ``text`` columns, ``[T, L]``). ``keys`` (``[B, KV, L, head_dim]``) are the
    layer's own post-RoPE keys from its cache when the caller has them: no key is projected again."""
    out: dict[str, Any] = {}
    pad = None if bool(padding.all()) else padding
    if keys is None and needs & {"text_attention", "llm_keys", "text_keys", "text_image_attention"}:
        keys = post_rope_keys(attn, hidden, rope)
    if "text_attention" in needs:
        out["text_attention"] = last_query_attention(attn, hidden, rope, pad, keys)
    if needs & {"llm_keys", "text_keys"}:
        b, _, n, _ = keys.shape
        out["keys"] = keys.transpose(1, 2).reshape(b, n, -1)
    if "text_image_attention" in needs:
        out["text_image_attention"] = [
            rows_attention(attn, hidden[b:b + 1], (rope[0][b:b + 1], rope[1][b:b + 1]), cols,
                           padding[b:b + 1], keys[b:b + 1])[0]
            for b, cols in enumerate(text)]
    return out


def input_signals(layer: nn.Module, final_norm: nn.Module | None, hidden: Tensor, rope: tuple[Tensor, Tensor],
                  padding: Tensor, needs: frozenset[str]) -> dict[str, Any]:
    """Read from the input of layer K itself: ``input_text_attention`` (layer K's own input norm, q/k
    projections and RoPE; the key projection is kept as ``k_proj`` ``[B, L, d_kv]``, so that layer K can
    take its kept rows instead of projecting them again) and the input through the decoder's final norm
    (``normed``)."""
    out: dict[str, Any] = {}
    if "input_text_attention" in needs:
        pad = None if bool(padding.all()) else padding
        attn, normed = layer.self_attn, layer.input_layernorm(hidden)
        out["k_proj"] = attn.k_proj(normed)
        keys = apply_rope(projected_heads(attn, "k", out["k_proj"]), *rope)
        out["input_text_attention"] = last_query_attention(attn, normed, rope, pad, keys)
    if needs & {"normed_hidden", "text_normed_hidden"}:
        out["normed"] = final_norm(hidden)
    return out


def reuses_keys(reducer: Any) -> bool:
    """Whether layer K takes the keys a stage projected to score it (``input_text_attention``) for the rows
    it keeps: a pruning stage keeps rows as they were. The runtime and the cost model both ask this."""
    return "input_text_attention" in reducer.needs and reducer.family == "pruning"


class ReusedProjection:
    """Stands in for a layer's ``k_proj.forward`` (installed by the run's HookSet): an ``llm`` stage that
    projected the keys of layer K's whole input to score it hands over the rows it kept, and layer K's
    next call with that many rows returns them instead of projecting again (rows of a row-wise
    projection of the same normed input: the same values). Any other call projects as usual."""

    def __init__(self, forward: Any):
        self.forward = forward
        self.pending: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        rows, self.pending = self.pending, None
        if rows is not None and rows.shape[:-1] == x.shape[:-1]:
            return rows
        return self.forward(x)


def text_relevance(image: Tensor, text: Tensor) -> Tensor:
    """``[T]``: the mean over image tokens (``[N, D]``) of the softmax over the text tokens (``[T, D]``) of
    their dot products."""
    return (_wide(image) @ _wide(text).T).softmax(dim=-1).mean(dim=0)


def stage_signals(needs: frozenset[str], measured: dict[str, Any], b: int, slots: Tensor, text: Tensor,
                  columns: Tensor, relevance: Tensor | None) -> dict[str, Tensor]:
    """The llm signals in ``needs`` for sample ``b``: rows of its image ``slots`` (in state order) or of
    its ``text`` columns; ``columns`` ``[L]`` is each column's index in the sample's own sequence."""
    out: dict[str, Tensor] = {}
    for name in needs:
        if name in ("text_attention", "input_text_attention"):
            out[name] = measured[name][b, slots]
        elif name == "text_image_attention":
            out[name] = measured[name][b][:, slots]
        elif name == "llm_keys":
            out[name] = measured["keys"][b, slots]
        elif name == "text_keys":
            out[name] = measured["keys"][b, text]
        elif name == "normed_hidden":
            out[name] = measured["normed"][b, slots]
        elif name == "text_normed_hidden":
            out[name] = measured["normed"][b, text]
        elif name == "sequence_index":
            out[name] = columns[slots]
        elif name == "text_sequence_index":
            out[name] = columns[text]
        elif name == "text_relevance":
            out[name] = relevance
    return out


def signals_of(values: dict[str, Tensor]) -> Signals:
    signals = Signals()
    for name, value in values.items():
        setattr(signals, name, value)
    return signals
