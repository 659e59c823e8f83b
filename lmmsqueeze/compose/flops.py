"""Analytic prefill cost of a compiled plan: MACs and FLOPs per decoder layer, by part.

Two conventions:

* ``exact`` (default): what the decoder really multiplies, per layer with ``n`` query tokens and
  ``c`` key positions (prefill: ``c = n``), hidden ``d``, KV width ``d_kv`` (GQA), FFN width ``m``::

      projections  n * (2 d^2 + 2 d d_kv)         Q, O: n d^2 each; K, V: n d d_kv each
      attention    2 n c d                         Q K^T and A V over every key position
      ffn          3 n d m  (gated) | 2 n d m      gate/up/down or up/down

  plus the reducers' own matrix products and the signal probes' query rows (over the layer's own
  cached keys), as a prefill with a KV cache (``generate``) computes them.
* ``fastv``: the FastV paper's ``4 n d^2 + 2 n^2 d + 2 n d m`` per layer (MAC-like; no GQA, a
  two-matrix FFN, no overhead), to reproduce the numbers papers print.

FLOPs are 2 x MACs. "Prefill FLOPs" cover the decoder layers (and overhead) and exclude the
LM head, as papers do; the LM head on the last position is reported apart. Softmax, norms and
other elementwise work are not counted (neither does ``torch.utils.flop_counter``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .geometry import ModelGeometry

CONVENTIONS = ("exact", "fastv")


@dataclass(frozen=True)
class LayerCost:
    """MACs of one decoder layer at prefill."""

    layer: int
    image_tokens: int
    tokens: int  # query tokens
    keys: int  # key positions
    projections: int
    attention: int
    ffn: int
    overhead: int = 0  # reducer work at this layer's input, probes at this layer, ProxyV's light MLP

    @property
    def macs(self) -> int:
        return self.projections + self.attention + self.ffn + self.overhead

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True)
class Cost:
    """Prefill cost of a plan for one sample."""

    convention: str
    text_tokens: int
    layers: tuple[LayerCost, ...]
    pre_llm_overhead: int  # MACs of vision-side probes and vision/projector reducers
    lm_head: int  # MACs of the LM head on the last position (not part of prefill_macs)
    vanilla_macs: int
    notes: tuple[str, ...] = field(default=())

    @property
    def prefill_macs(self) -> int:
        return sum(layer.macs for layer in self.layers) + self.pre_llm_overhead

    @property
    def prefill_flops(self) -> int:
        return 2 * self.prefill_macs

    @property
    def vanilla_prefill_flops(self) -> int:
        return 2 * self.vanilla_macs

    @property
    def saving(self) -> float:
        """Fraction of the vanilla prefill FLOPs that the plan saves."""
        return 1.0 - self.prefill_macs / self.vanilla_macs if self.vanilla_macs else 0.0

    def parts(self) -> dict[str, int]:
        """MACs split by part, summed over layers."""
        return {
            "projections": sum(lc.projections for lc in self.layers),
            "attention": sum(lc.attention for lc in self.layers),
            "ffn": sum(lc.ffn for lc in self.layers),
            "overhead": sum(lc.overhead for lc in self.layers) + self.pre_llm_overhead,
            "lm_head": self.lm_head,
        }



def si_unit(x: float) -> tuple[str, float]:
    """The SI prefix (``"P"`` ... ``"K"``, or ``""``) and scale to print ``x`` FLOPs with."""
    prefixes = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
    return next(((u, s) for u, s in prefixes if abs(x) >= s), ("", 1.0))


def layer_macs(
    g: ModelGeometry, n: int, c: int | None = None, convention: str = "exact"
) -> tuple[int, int, int]:
    """(projections, attention, ffn) MACs of an ordinary decoder layer with ``n`` queries over ``c`` keys."""
    c = n if c is None else c
    d, m = g.hidden_size, g.intermediate_size
    if convention == "fastv":
        return 4 * n * d * d, 2 * n * c * d, 2 * n * d * m
    d_kv = g.num_kv_heads * g.head_dim
    d_q = g.num_heads * g.head_dim
    projections = n * d * d_q + 2 * n * d * d_kv + n * d_q * d
    attention = 2 * n * c * d_q
    ffn = (3 if g.gated_ffn else 2) * n * d * m
    return projections, attention, ffn


def probe_macs(g: ModelGeometry, needs: frozenset[str], n: int, text_after_image: int) -> int:
    """MACs of the decoder-side signal probes of a stage at layer K, where ``n`` tokens enter layers K-1
    and K. Probes of layer K-1 read the keys that layer just wrote to its KV cache and project only their
    query rows; ``input_text_attention`` reads layer K's input before that layer runs, so it projects
    the keys too. Readings of the input are free."""
    d = g.hidden_size
    d_q = g.num_heads * g.head_dim
    d_kv = g.num_kv_heads * g.head_dim
    macs = 0
    if "text_attention" in needs:  # q of the last row, its row of Q K^T
        macs += d * d_q + n * d_q
    if "input_text_attention" in needs:  # q of the last row, k of every row, one row of Q K^T
        macs += d * d_q + n * d * d_kv + n * d_q
    if "text_image_attention" in needs:  # q of the text rows after the image, their rows of Q K^T
        r = text_after_image
        macs += r * d * d_q + r * n * d_q
    return macs  # llm_keys / text_keys: the cached keys themselves


def relevance_macs(g: ModelGeometry, image_tokens: int, text_after_image: int) -> int:
    """MACs of ``text_relevance`` at the decoder input: image embeddings @ text embeddings^T."""
    return image_tokens * text_after_image * g.hidden_size


def vision_probe_macs(g: ModelGeometry, needs: frozenset[str]) -> int:
    """MACs of the vision-side probes for one image (every crop the vision tower encodes)."""
    t, dv = g.vision_tokens, g.vision_hidden_size
    if not t or not dv:
        return 0
    macs = 0
    # one block gives every signal: its keys, and all of Q K^T for the stand-ins
    if g.cls_attention == "mean":
        if needs & {"cls_attention", "vision_keys", "last_cls_attention", "last_vision_keys"}:
            macs += t * dv * dv
        if needs & {"cls_attention", "last_cls_attention"}:
            macs += t * dv * dv + t * t * dv
        return g.vision_crops * macs
    for attention, keys in (("cls_attention", "vision_keys"), ("last_cls_attention", "last_vision_keys")):
        if needs & {attention, keys}:  # the keys of every token of that layer, projected once
            macs += t * dv * dv
        if attention in needs:  # q of [CLS], one row of Q K^T
            macs += dv * dv + t * dv
    return g.vision_crops * macs


def metric_width(g: ModelGeometry, reducer: Any, feature_width: int) -> int:
    """The width of the rows a reducer multiplies (see ``Reducer.metric_signal``): a signal's width, or
    ``feature_width`` (its placement's hidden states) when it reads hidden states."""
    signal = reducer.metric_signal()
    if signal == "vision_keys":  # averaged over heads
        return g.vision_hidden_size // g.vision_heads
    if signal == "last_vision_keys":
        return g.vision_hidden_size
    if signal == "llm_keys":
        return g.num_kv_heads * g.head_dim
    if signal is not None:
        raise ValueError(f"{reducer.name}: no width is known for signal {signal!r}")
    return feature_width


@dataclass(frozen=True)
class CostContext:
    """What a placement's cost methods read besides the stage and the geometry."""

    text_tokens: int  # non-image tokens of the prompt
    text_after_image: int  # prompt tokens after the last image token (queries of text probes)
    tokens_per_layer: tuple[int, ...]  # image tokens entering each decoder layer (all images)
    images: int  # images in the prompt
    convention: str  # exact | fastv


def plan_cost(plan: Any, text_tokens: int = 64, convention: str = "exact",
              text_after_image: int | None = None, images: int = 1) -> Cost:
    """The prefill cost of a :class:`~lmmsqueeze.compose.plan.Plan` for one sample.

    Every stage's placement says what the stage adds (:meth:`~.placements.Placement.overhead`) and
    which decoder layers it changes (:meth:`~.placements.Placement.layer_cost`); other layers are
    ordinary ones over the image tokens that reach them.

    Args:
        plan: the compiled plan (its geometry gives the shapes, its stages the token counts).
        text_tokens: non-image tokens of the prompt (system prompt, question, chat markup).
        convention: ``exact`` or ``fastv``.
        text_after_image: prompt tokens after the last image token (for probes reading every text
            query); defaults to ``text_tokens``.
        images: images in the prompt (token counts scale with it).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    g = plan.geometry
    after = text_tokens if text_after_image is None else text_after_image
    tokens_per_layer = tuple(images * t for t in plan.tokens_per_layer())
    ctx = CostContext(text_tokens, after, tokens_per_layer, images, convention)

    overhead_at: dict[int, int] = {}
    pre_llm = 0
    if convention == "exact":  # the fastv convention counts no overhead
        needs = frozenset().union(*(s.reducer.needs for s in plan.stages)) if plan.stages else frozenset()
        reads = needs | frozenset().union(*(s.reducer.optional & g.signals for s in plan.stages))
        pre_llm += images * vision_probe_macs(g, reads)
        if "text_relevance" in needs:
            overhead_at[0] = relevance_macs(g, tokens_per_layer[0], after)
        for stage in plan.stages:
            for layer, macs in stage.where.overhead(stage, g, ctx).items():
                if layer is None:
                    pre_llm += macs
                else:
                    overhead_at[layer] = overhead_at.get(layer, 0) + macs

    layers = []
    for i, image_tokens in enumerate(tokens_per_layer):
        changed = next((c for s in plan.stages if (c := s.where.layer_cost(s, g, i, ctx)) is not None), None)
        if changed is not None:
            layers.append(dataclasses.replace(changed, overhead=changed.overhead + overhead_at.get(i, 0)))
            continue
        n = text_tokens + image_tokens
        proj, attn, ffn = layer_macs(g, n, n, convention)
        layers.append(LayerCost(i, image_tokens, n, n, proj, attn, ffn, overhead_at.get(i, 0)))

    n0 = text_tokens + images * g.image_tokens
    vanilla = g.num_layers * sum(layer_macs(g, n0, n0, convention))
    notes = []
    if convention == "fastv":
        notes.append("fastv convention: 4nd^2 + 2n^2d + 2ndm per layer, no overhead")
    return Cost(convention, text_tokens, tuple(layers), pre_llm, g.hidden_size * g.vocab_size, vanilla,
                tuple(notes))
