"""The ``proxyv`` placement: from decoder layer L on, ProxyV layers stand in for the model's own.

It checks where a ProxyV stage may start, costs its layers (:func:`proxyv_layer_macs`), resolves the
trained adapter a plan runs with, and installs by swapping decoder layers L..end for
:class:`ProxyVDecoderLayer` (through the run's ``HookSet``, so they are put back on exit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ..compose.flops import CostContext, LayerCost, layer_macs
from ..compose.geometry import ModelGeometry
from ..compose.placements import Placement, register_placement
from ..compose.plan import PlannedStage, reduced_after_kept
from ..errors import PipelineError
from ..reducers.base import Reducer
from .attach import adapter_pipeline, resolve_adapter
from .layer import control_layer, proxyv_layer
from .stage import proxyv_stage
from .state import prefill_state


class ProxyVPlacement(Placement):
    """Decoder layers ``layer..end`` run as ProxyV layers (``layer`` = the number of layers: none)."""

    name: ClassVar[str] = "proxyv"
    order: ClassVar[int] = 3
    layered: ClassVar[bool] = True
    exclusive: ClassVar[bool] = True
    keeps_tokens: ClassVar[bool] = True
    takes_weights: ClassVar[bool] = True
    title: ClassVar[str] = "ProxyV"
    where: ClassVar[str] = "in ProxyV layers"
    hint: ClassVar[str] = "use a proxyv stage"

    def check(self, where: str, reducer: Reducer, layer: int | None, geometry: ModelGeometry,
              earlier: Sequence[PlannedStage]) -> None:
        if not 0 <= layer <= geometry.num_layers:
            raise PipelineError(f"{where}: layer={layer} is beyond the model: ProxyV starts at a layer in "
                                f"0..{geometry.num_layers} ({geometry.num_layers} means no ProxyV layer)")
        if any(s.placement == self.name for s in earlier):
            raise PipelineError(f"{where}: a pipeline holds at most one proxyv stage")
        last = max((s.layer for s in earlier if s.where.layered), default=-1)
        if last >= layer:
            raise reduced_after_kept(where, last, self.titled(), layer)

    def layer_cost(
        self, stage: PlannedStage, g: ModelGeometry, layer: int, ctx: CostContext
    ) -> LayerCost | None:
        if layer < stage.layer:
            return None
        reducer = stage.reducer
        image_tokens = ctx.tokens_per_layer[layer]
        if reducer.variant == "control":  # an ordinary layer + the VisionMLP branch on the image tokens
            n = ctx.text_tokens + image_tokens
            proj, attn, ffn = layer_macs(g, n, n, ctx.convention)
            h = reducer.width(g.hidden_size)
            branch = image_tokens * (3 * g.hidden_size * h + 2 * h * h)
            return LayerCost(layer, image_tokens, n, n, proj, attn, ffn, branch)
        groups = ctx.images * (len(stage.grids_in) if stage.grids_in else 1)
        proxies = ctx.images * reducer.proxy_count(stage.tokens_in, stage.grids_in)
        width = reducer.width(g.hidden_size)
        nonspatial = reducer.variant == "nonspatial"
        proj, attn, ffn, light = proxyv_layer_macs(g, image_tokens, proxies, ctx.text_tokens, width,
                                                   splat=nonspatial, convention=ctx.convention)
        if nonspatial and layer == stage.layer:  # the initializer: keys, logits, pooling
            light += (image_tokens * g.hidden_size * width
                      + proxies * (image_tokens // groups) * (width + g.hidden_size))
        return LayerCost(layer, image_tokens, proxies + ctx.text_tokens,
                         image_tokens + proxies + ctx.text_tokens, proj, attn, ffn, light)

    def prepare_weights(self, model: Any, plan: Any, weights: Any) -> Any:
        return resolve_adapter(model, plan, weights) if plan.at(self.name) else None

    def pipeline_of(self, weights: Any) -> str | None:
        return adapter_pipeline(weights) if isinstance(weights, str) or hasattr(weights, "__fspath__") else (
            getattr(getattr(weights, "config", None), "pipeline", None))

    def install(self, run: Any, hooks: Any, stages: list[PlannedStage]) -> None:
        stage = proxyv_stage(run.plan)
        if stage is None:  # starts after the last layer: nothing runs
            return
        layers = run.family.layers
        for i in range(stage.layer, len(layers)):
            hooks.swap(layers, i, ProxyVDecoderLayer(layers[i], run, i))


class ProxyVDecoderLayer(nn.Module):
    """Stands in for decoder layer ``index`` while a ProxyV plan is applied: ProxyV at prefill,
    the original layer otherwise (decode steps, text-only calls)."""

    def __init__(self, inner: nn.Module, run: Any, index: int):
        super().__init__()
        self.inner = inner
        self.index = index
        object.__setattr__(self, "_run", run)  # not a submodule

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        state = prefill_state(self._run, hidden_states, kwargs)
        if state is None:
            return self.inner(hidden_states, *args, **kwargs)
        mlp = self._run.weights.mlp(self.index)
        if proxyv_stage(self._run.plan).reducer.variant == "control":
            return control_layer(self.inner(hidden_states, *args, **kwargs), hidden_states, mlp, state)
        return proxyv_layer(self.inner, mlp, state, hidden_states, kwargs["position_embeddings"],
                            kwargs.get("cache"))


def proxyv_layer_macs(g: ModelGeometry, image_tokens: int, proxies: int, other_tokens: int, mlp_hidden: int,
                      splat: bool = False, convention: str = "exact") -> tuple[int, int, int, int]:
    """(projections, attention, ffn, light-MLP) MACs of one ProxyV layer.

    ``nq = proxies + other_tokens`` queries (proxies, newlines, text); keys and values over every
    image token too (``nkv = image_tokens + nq``); attention as the layer runs it, in two calls that
    skip what the masks drop: the proxies over the proxies and other tokens, the other tokens over
    the sequence (``image_tokens + other_tokens`` keys); the FFN runs on the ``nq`` queries only; each
    image token is updated by the light MLP (two d->h inputs, 2h->h, h->d), whose guidance
    projection runs on the proxies (and, for the non-spatial variant, the projected proxies are
    splatted back to every image token, ``image_tokens * proxies * h``). With ``convention="fastv"``
    the layer is counted as FastV counts one: ``d^2`` per token for each of Q, O (queries) and K, V
    (keys), no GQA, a two-matrix FFN; the light MLP the same in both conventions.
    """
    d, m, h = g.hidden_size, g.intermediate_size, mlp_hidden
    d_q = g.num_heads * g.head_dim
    d_kv = g.num_kv_heads * g.head_dim
    nq = proxies + other_tokens
    nkv = image_tokens + nq
    if convention == "fastv":
        projections = nq * 2 * d * d + nkv * 2 * d * d
        attention = 2 * nq * nkv * d
        ffn = 2 * nq * d * m
    else:
        projections = nq * 2 * d * d_q + nkv * 2 * d * d_kv
        attention = 2 * (proxies * nq + other_tokens * (image_tokens + other_tokens)) * d_q
        ffn = (3 if g.gated_ffn else 2) * nq * d * m
    light = image_tokens * (d * h + 2 * h * h + h * d)
    light += proxies * d * h  # the guidance projection runs on the proxies
    if splat:  # then every image token takes its splat of them
        light += image_tokens * proxies * h
    return projections, attention, ffn, light


register_placement(ProxyVPlacement())
