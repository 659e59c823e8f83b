"""The ProxyV decoder layer at prefill, computed with the LLM's own weights.

Queries are the proxies and every non-image token; keys and values are the image tokens, the
proxies and every non-image token. Masks: causal by position, proxies never see image tokens,
text never sees proxies. So attention runs as two calls that skip the scores every mask would
drop: the proxies over [proxies; non-image tokens], the non-image tokens over the sequence. The
FFN runs on the queries only. Image tokens skip attention-as-query
and the FFN: the layer's VisionMLP updates them from their own state and their proxy's output.
Only the sequence tokens' keys and values enter the KV cache, so decode steps are ordinary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import repeat_kv

from ..attention import apply_rope, decoder_heads
from ..reducers._common import bilinear_grids
from .modules import ProxyVAdapter, VisionMLP
from .stage import ProxyV


def _rows(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class ProxyVState:
    """What the ProxyV layers of one prefill share (batch-first tensors)."""

    image: Tensor  # [B, n] slots of the image tokens in the sequence
    others: Tensor  # [B, t] slots of every other token
    positions: Tensor  # [B, N] position of every sequence token
    padding: Tensor  # [B, N] True for real tokens
    proxies: Tensor  # [B, P, d] proxy states entering the next layer
    proxy_positions: Tensor  # [B, P]
    proxy_rope: tuple[Tensor, Tensor]  # cos/sin [B, P, head_dim]
    assign: Tensor | None  # [n] proxy of each image token (spatial)
    splat: Tensor | None  # [B, n, P] splat weights (non-spatial)
    proxy_start: Tensor | None = None  # [B, P] the first position of each proxy's image
    layout: _Layout | None = None  # query rows, RoPE and mask: the same in every ProxyV layer


@dataclass(frozen=True)
class _Layout:
    """What every ProxyV layer of one prefill computes alike (made by the first one)."""

    q_rows: Tensor  # [B, nq] rows of [sequence; proxies] that are queries: proxies, then the others
    q_rope: tuple[Tensor, Tensor]  # cos/sin of the queries
    kv_rope: tuple[Tensor, Tensor]  # cos/sin of [sequence; proxies]
    proxy_allowed: Tensor  # [B, 1, P, P+t] what the proxies see of [proxies; others]
    text_allowed: Tensor  # [B, 1, t, N] what the others see of the sequence
    # (start, stop) when every sample's image tokens fill slots start..stop-1 in state order (one image,
    # no newline tokens): the layer then reads and writes them as a slice instead of gathering rows
    image_span: tuple[int, int] | None

    @classmethod
    def of(cls, st: ProxyVState, rope: tuple[Tensor, Tensor], b: int, n_seq: int) -> _Layout:
        p = st.proxies.shape[1]
        proxy_rows = (n_seq + torch.arange(p, device=st.image.device)).expand(b, -1)
        q_rows = torch.cat([proxy_rows, st.others], 1)
        kv_rope = tuple(torch.cat([t.expand(b, -1, -1), pt], 1)  # sequence, then proxies
                        for t, pt in zip(rope, st.proxy_rope, strict=True))
        q_rope = tuple(_rows(t, q_rows) for t in kv_rope)
        allowed = proxyv_mask(st, q_rows, n_seq)  # [B, nq, N+P]; the two calls take the parts it allows
        others = st.others[:, None].expand(-1, p, -1)
        proxy_allowed = torch.cat([allowed[:, :p, n_seq:], allowed[:, :p, :n_seq].gather(2, others)], 2)
        return cls(q_rows, q_rope, kv_rope, proxy_allowed[:, None], allowed[:, p:, :n_seq][:, None],
                   _span(st.image))


def _span(image: Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` when ``image`` (``[B, n]`` slots) is ``start, start + 1, ...`` in every row."""
    if not image.shape[1]:
        return None
    start = int(image[0, 0])
    run = torch.arange(start, start + image.shape[1], device=image.device)
    return (start, start + image.shape[1]) if torch.equal(image, run.expand_as(image)) else None


def make_proxies(stage: ProxyV, adapter: ProxyVAdapter, image: Tensor, grids: Any, groups: Tensor
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Proxies from the image tokens entering the first ProxyV layer.

    Args:
        image: ``[B, n, d]`` image tokens in state order.
        grids: per-crop grids while the order is a grid (spatial needs them).
        groups: ``[n]`` group of each token (crop, or image once crops are gone) for non-spatial.

    Returns:
        proxies ``[B, P, d]``, assign ``[n]`` (spatial) or None, splat ``[B, n, P]`` (non-spatial) or None.
    """
    b, n, d = image.shape
    if stage.variant == "spatial":  # each crop's grid resized, as the bilinear reducer does
        proxies, assign = bilinear_grids(image, grids, stage.proxy_grids(grids))
        return proxies, assign, None
    proxies = []
    ids = torch.unique(groups)
    total = stage.proxies * ids.numel()
    splat = image.new_zeros(b, n, total)
    for j, g in enumerate(ids):
        members = torch.nonzero(groups == g).flatten()
        p, s = adapter.initializer(image[:, members])  # [B, k, d], [B, m, k]
        proxies.append(p)
        cols = slice(j * stage.proxies, (j + 1) * stage.proxies)
        splat[:, members, cols] = s
    return torch.cat(proxies, 1), None, splat


def proxyv_layer(layer: nn.Module, mlp: VisionMLP, st: ProxyVState | list[ProxyVState], hidden: Tensor,
                 rope: tuple[Tensor, Tensor], cache: Any) -> Tensor:
    """One decoder layer >= L at prefill. Returns the new sequence hidden states (same shape).

    ``st`` is one batched state, or one state per sample when samples hold different numbers of
    image tokens (or grids): then each sample runs alone and the cache gets the stacked keys/values.
    """
    if isinstance(st, ProxyVState):
        out, k, v = _proxyv_sample(layer, mlp, st, hidden, rope)
    else:
        cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in rope)
        parts = [_proxyv_sample(layer, mlp, s, hidden[b:b + 1], (cos[b:b + 1], sin[b:b + 1]))
                 for b, s in enumerate(st)]
        out, k, v = (torch.cat(x) for x in zip(*parts, strict=True))
    if cache is not None:
        cache.update(k, v, layer.self_attn.layer_idx)
    return out


def _proxyv_sample(layer: nn.Module, mlp: VisionMLP, st: ProxyVState, hidden: Tensor,
                   rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The layer for a batch sharing one state: new sequence states and the sequence tokens' keys/values."""
    b, n_seq, d = hidden.shape
    p = st.proxies.shape[1]
    attn = layer.self_attn
    if st.layout is None:
        st.layout = _Layout.of(st, rope, b, n_seq)
    lay = st.layout
    norm, groups = layer.input_layernorm, attn.num_key_value_groups
    seq_normed, proxy_normed = norm(hidden), norm(st.proxies)  # row-wise: no [sequence; proxies] copy
    queries = torch.cat([proxy_normed, _rows(seq_normed, st.others)], 1)  # the layout's q_rows order
    nq = queries.shape[1]
    q = apply_rope(decoder_heads(attn, "q", queries), *lay.q_rope)
    # keys and values of the sequence and the proxies in one product each (the few proxy rows alone run
    # at a fraction of the speed); the cache copies the sequence's part (DynamicCache concatenates)
    rows = torch.cat([seq_normed, proxy_normed], 1)
    # every temporary goes as soon as it is used: the FFN below runs at the layer's memory peak
    del seq_normed, proxy_normed, queries
    k_all = apply_rope(decoder_heads(attn, "k", rows), *lay.kv_rope)
    v_all = decoder_heads(attn, "v", rows)
    del rows
    k_seq, k_proxy = k_all[:, :, :n_seq], k_all[:, :, n_seq:]
    v_seq, v_proxy = v_all[:, :, :n_seq], v_all[:, :, n_seq:]
    others = st.others[:, None, :, None].expand(-1, k_seq.shape[1], -1, k_seq.shape[-1])
    k_small = repeat_kv(torch.cat([k_proxy, k_seq.gather(2, others)], 2), groups)
    v_small = repeat_kv(torch.cat([v_proxy, v_seq.gather(2, others)], 2), groups)
    del k_proxy, v_proxy
    out = _attend(attn, q[:, :, :p], k_small, v_small, lay.proxy_allowed)
    del k_small, v_small
    out = torch.cat([out, _attend(attn, q[:, :, p:], repeat_kv(k_seq, groups), repeat_kv(v_seq, groups),
                                  lay.text_allowed)], 2)
    del q
    out = attn.o_proj(out.transpose(1, 2).reshape(b, nq, -1))
    h = torch.cat([st.proxies, _rows(hidden, st.others)], 1) + out
    del out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    new_proxies, new_others = h[:, :p], h[:, p:]
    span = lay.image_span
    image_in = hidden[:, span[0]:span[1]] if span else _rows(hidden, st.image)
    if st.assign is not None:
        context = mlp.context_proj(new_proxies)[:, st.assign]
    else:  # splat the projected proxies (the projection is linear: cheaper than projecting the splat)
        context = st.splat @ mlp.context_proj(new_proxies)
    image_out = mlp(image_in, context)
    st.proxies = new_proxies
    # every slot is an image token or another token: one new tensor, written in place
    seq = torch.empty_like(hidden)
    seq.scatter_(1, st.others[..., None].expand(-1, -1, d), new_others)
    if span:
        seq[:, span[0]:span[1]] = image_out
    else:
        seq.scatter_(1, st.image[..., None].expand(-1, -1, d), image_out)
    return seq, k_seq, v_seq


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Masked attention of ``q`` over ``k``/``v`` (``[B, H, *, hd]``), as the layer's backend computes it."""
    if not q.shape[2]:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    if getattr(attn.config, "_attn_implementation", "sdpa") == "eager":  # plain matmuls, as eager layers do
        logits = (q @ k.transpose(-1, -2)) * attn.scaling
        weights = logits.masked_fill(~allowed, float("-inf")).float().softmax(dim=-1).to(q.dtype)
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=attn.scaling)


def proxyv_mask(st: ProxyVState, q_rows: Tensor, n_seq: int) -> Tensor:
    """``[B, nq, N+P]`` True where a query may attend: causal by position over real tokens; a proxy
    sees the proxies and the non-image tokens before its own image only (never image tokens, nor text
    or newline tokens inside or after its image, whatever the number of proxies); text never sees
    proxies (every query sees itself)."""
    b, p = st.proxies.shape[:2]
    device = q_rows.device
    key_pos = torch.cat([st.positions, st.proxy_positions], 1)
    query_pos = key_pos.gather(1, q_rows)
    key_real = torch.cat([st.padding, torch.ones(b, p, dtype=torch.bool, device=device)], 1)
    key_proxy = (torch.arange(n_seq + p, device=device) >= n_seq)[None, :].expand(b, -1)
    is_image = torch.zeros(b, n_seq + p, dtype=torch.bool, device=device).scatter(1, st.image, True)
    query_proxy = (torch.arange(q_rows.shape[1], device=device) < p)[None, :, None]
    allowed = (key_pos[:, None, :] <= query_pos[:, :, None]) & key_real[:, None, :]
    if p:  # proxy queries: proxies, and non-image tokens before their image
        start = st.proxy_start if st.proxy_start is not None else st.proxy_positions[:, :1].expand(-1, p)
        before = (key_pos[:, None, :] < start[:, :, None]) & ~is_image[:, None, :] & ~key_proxy[:, None, :]
        for_proxies = key_proxy[:, None, :] | before  # [B, P, N+P]
        allowed[:, :p] &= for_proxies
    allowed &= ~(~query_proxy & key_proxy[:, None, :])
    return allowed | (torch.arange(n_seq + p, device=device)[None, None, :] == q_rows[:, :, None])


def control_layer(out: Tensor, hidden: Tensor, mlp: VisionMLP, st: ProxyVState | list[ProxyVState]) -> Tensor:
    """The control's layer: the ordinary layer's output, plus on every image token the VisionMLP branch of
    its input (guided by its own output)."""
    if isinstance(st, list):  # samples whose image tokens differ: one by one
        return torch.cat([control_layer(out[b:b + 1], hidden[b:b + 1], mlp, s) for b, s in enumerate(st)])
    if not st.image.shape[1]:
        return out
    index = st.image[..., None].expand(-1, -1, out.shape[-1])
    new = out.gather(1, index)
    update = mlp.branch(hidden.gather(1, index), mlp.context_proj(new))
    return out + torch.zeros_like(out).scatter(1, index, update)
