"""Attention math shared by the runtime, the model families and ProxyV: RoPE and one-query attention
recomputed from a layer's own projections.

Neither probe switches a layer to eager attention or materialises an attention matrix: each
computes the single softmax row it needs, O(N * d), so they work under sdpa and flash-attn.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import repeat_kv
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (Llama's RoPE) with the same roundings, in fewer passes.

    ``x``: ``[B, H, N, hd]``; ``cos``/``sin``: ``[B, N, hd]``. ``rotate_half(x)`` is ``[-x2, x1]``, so
    the first half is ``x1 * cos1 - x2 * sin1`` (adding ``(-x2) * sin1`` rounds as subtracting
    ``x2 * sin1``) and the second ``x2 * cos2 + x1 * sin2``: each half updated in place, without the
    negated and concatenated copy of ``x``.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def decoder_heads(attn: nn.Module, which: str, x: Tensor) -> Tensor:
    """``[B, H, N, head_dim]``: a decoder attention's ``q``, ``k`` or ``v`` heads of ``x`` (``[B, N, D]``),
    before RoPE, each head normalised when the layer normalises it (Qwen3's ``q_norm``/``k_norm``)."""
    return projected_heads(attn, which, getattr(attn, f"{which}_proj")(x))


def projected_heads(attn: nn.Module, which: str, proj: Tensor) -> Tensor:
    """:func:`decoder_heads` from the projection's output ``[B, N, H * head_dim]``."""
    b, n, _ = proj.shape
    heads = proj.view(b, n, proj.shape[-1] // attn.head_dim, attn.head_dim)  # n may be 0 (no proxies)
    norm = getattr(attn, f"{which}_norm", None) if which in ("q", "k") else None
    if norm is not None:
        heads = norm(heads)
    return heads.transpose(1, 2)


def last_query_attention(
    attn: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    key_padding: Tensor | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Head-mean softmax attention of the last position to every position, as the layer computes it.

    Args:
        attn: a decoder self-attention module with ``q_proj``, ``k_proj``, ``head_dim``,
            ``scaling`` and ``num_key_value_groups`` (Llama, Mistral, Qwen2, ...).
        hidden_states: ``[B, N, D]`` the (normed) input of the attention module.
        position_embeddings: RoPE ``(cos, sin)``, each ``[B, N, head_dim]``.
        key_padding: ``[B, N]`` bool, True for real tokens (False columns get no attention).
        keys: ``[B, KV, N, head_dim]`` the layer's post-RoPE keys when the caller has them (the KV cache
            after this layer's prefill): only the last query is projected then.

    Returns:
        ``[B, N]`` float32 attention weights of the last query, averaged over heads.
    """
    last = torch.tensor([hidden_states.shape[1] - 1], device=hidden_states.device)
    return rows_attention(attn, hidden_states, position_embeddings, last, key_padding, keys)[:, 0]


def rows_attention(
    attn: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    rows: Tensor,
    key_padding: Tensor | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Head-mean causal attention of the queries at ``rows`` to every position (one sample or a batch
    sharing ``rows``), computed as the layer does; ``keys`` (``[B, KV, N, head_dim]``, post-RoPE) are
    the layer's own when given, else projected from ``hidden_states``.

    Returns:
        ``[B, R, N]`` float32 weights; row r attends to positions ``<= rows[r]``.
    """
    b, n, _ = hidden_states.shape
    cos, sin = position_embeddings
    q = decoder_heads(attn, "q", hidden_states[:, rows])
    q = apply_rope(q, cos[:, rows], sin[:, rows])
    k = apply_rope(decoder_heads(attn, "k", hidden_states), cos, sin) if keys is None else keys
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # [B, H, R, N]
    allowed = torch.arange(n, device=rows.device)[None, :] <= rows[:, None]  # causal
    allowed = allowed[None, None].expand(b, 1, -1, -1)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].to(torch.bool)
    logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def vision_projection(attn: nn.Module, which: str, x: Tensor) -> Tensor:
    """A ViT attention's ``q`` or ``k`` projection of ``x`` (all heads side by side), normalised over its
    full width when the layer does so (InternViT-6B's ``q_norm``/``k_norm``)."""
    out = getattr(attn, f"{which}_proj")(x)
    norm = getattr(attn, f"{which}_norm", None)
    return out if norm is None else norm(out)


def cls_query_attention(attn: nn.Module, hidden_states: Tensor, keys: Tensor | None = None) -> Tensor:
    """Head-mean attention of token 0 ([CLS]) to every token in a ViT attention layer (CLIP-style).

    Args:
        attn: a vision self-attention module with ``q_proj``, ``k_proj``, ``head_dim`` and ``scale``.
        hidden_states: ``[B, T, D]`` the (normed) input of the attention module.
        keys: ``attn.k_proj(hidden_states)`` when the caller has it already.

    Returns:
        ``[B, T]`` float32 weights (column 0 is [CLS] attending to itself).
    """
    b, t, _ = hidden_states.shape
    hd = attn.head_dim
    q = vision_projection(attn, "q", hidden_states[:, :1]).view(b, 1, -1, hd).transpose(1, 2)
    k = vision_projection(attn, "k", hidden_states) if keys is None else keys
    k = k.view(b, t, -1, hd).transpose(1, 2)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def mean_received_attention(attn: nn.Module, hidden_states: Tensor, cu_seqlens: Tensor,
                            position_embeddings: tuple[Tensor, Tensor], keys: Tensor | None = None,
                            budget: int = 2 ** 26) -> Tensor:
    """For a vision tower without [CLS] (Qwen2-VL's): the attention each token receives, averaged over
    heads and over every query of its own segment (an image, as ``cu_seqlens`` delimits them).

    Recomputed from the block's fused ``qkv`` projection and its 2-D RoPE, a chunk of queries at a
    time (at most ``budget`` attention weights, 256 MB in float32), so no full attention matrix is
    ever held.

    Args:
        attn: the block's attention (``qkv``, ``num_heads``, ``head_dim``, ``scaling``).
        hidden_states: ``[S, C]`` the (normed) input of the attention module, all images packed.
        cu_seqlens: ``[segments + 1]`` segment boundaries.
        position_embeddings: vision RoPE ``(cos, sin)``, each ``[S, head_dim]``.
        keys: :func:`vision_keys_fused` of ``hidden_states`` when the caller has them already.

    Returns:
        ``[S]`` float32; each segment's values sum to 1.
    """
    s, c = hidden_states.shape
    q = torch.nn.functional.linear(hidden_states, attn.qkv.weight[:c], attn.qkv.bias[:c])
    k = vision_keys_fused(attn, hidden_states) if keys is None else keys
    q, k = apply_rotary_pos_emb_vision(
        q.view(s, attn.num_heads, -1).float(), k.view(s, attn.num_heads, -1).float(), *position_embeddings
    )
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, S, hd]
    out = torch.zeros(s, dtype=torch.float32, device=hidden_states.device)
    bounds = cu_seqlens.tolist()
    for a, b in itertools.pairwise(bounds):
        keys = k[:, a:b]
        chunk = max(1, budget // (attn.num_heads * (b - a)))
        for start in range(a, b, chunk):
            stop = min(start + chunk, b)
            weights = (q[:, start:stop] @ keys.transpose(1, 2) * attn.scaling).softmax(-1)  # [H, q, n]
            out[a:b] += weights.sum(dim=(0, 1))
        out[a:b] /= attn.num_heads * (b - a)
    return out


def crop_received_attention(attn: nn.Module, hidden_states: Tensor, keys: Tensor | None = None,
                            budget: int = 2 ** 26) -> Tensor:
    """For a ViT without [CLS] and without RoPE (SigLIP): the attention each token receives, averaged
    over heads and over every query of its crop, recomputed from the layer's ``q_proj``/``k_proj`` a
    chunk of queries at a time (at most ``budget`` weights).

    Args:
        attn: a vision self-attention module with ``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``
            and ``scale``.
        hidden_states: ``[crops, T, D]`` the (normed) input of the attention module.
        keys: ``attn.k_proj(hidden_states)`` when the caller has it already.

    Returns:
        ``[crops, T]`` float32; each crop's values sum to 1.
    """
    b, t, _ = hidden_states.shape
    h, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(hidden_states).view(b, t, h, hd).transpose(1, 2).float()
    k = (attn.k_proj(hidden_states) if keys is None else keys).view(b, t, h, hd).transpose(1, 2).float()
    out = torch.zeros(b, t, dtype=torch.float32, device=hidden_states.device)
    chunk = max(1, budget // (h * t))
    for crop in range(b):
        for start in range(0, t, chunk):
            weights = (q[crop, :, start:start + chunk] @ k[crop].transpose(-1, -2) * attn.scale).softmax(-1)
            out[crop] += weights.sum(dim=(0, 1))
    return out / (h * t)


def vision_keys_fused(attn: nn.Module, hidden_states: Tensor) -> Tensor:
    """``[S, C]`` the keys (before RoPE, heads concatenated) of a fused-``qkv`` vision attention."""
    c = hidden_states.shape[-1]
    return torch.nn.functional.linear(hidden_states, attn.qkv.weight[c:2 * c], attn.qkv.bias[c:2 * c])
