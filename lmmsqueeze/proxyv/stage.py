"""The `proxyv` pipeline stage: its parameters, validation and proxy counts (no tensors)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ..reducers.base import Grids, Reducer, Signals, TokenState
from ..reducers.registry import register_reducer


@register_reducer(
    "proxyv",
    family="proxy",
    placements=("proxyv",),
    keeps_grid=True,
    cite="Wu, Lu, Liu, Streamline Without Sacrifice: Squeeze out Computation Redundancy in LMM, ICML 2025",
    code="penghao-wu/ProxyV, llava/model/language_model/llava_llama.py::LlavaLlamaModel.forward, "
    "decoder_forward (llava/model/vision_mlp.py, llava/model/llava_arch.py for masks and positions)",
    fidelity="exact layer computation (tested from the weights); each image's proxies take positions from "
    "that image's start and see the text before it, as released. LLaVA-NeXT: transformers unpads the crops "
    "and adds a newline per row, where the release keeps whole crops and one newline per crop, so the "
    "sub-crops' proxies come from their one unpadded grid (the base crop has its own), not per crop",
)
@dataclass(frozen=True)
class ProxyV(Reducer):
    """From decoder layer ``layer`` on, a few proxy tokens take the image tokens' attention queries and
    FFN; every image token stays (text attends to all of them) and is updated by a light MLP guided by
    its proxy.

    ``spatial`` proxies resize each crop's grid by ``factor`` (bilinear); ``nonspatial`` proxies are
    ``proxies`` learned queries per crop (per image once crops are gone) pooling the image tokens,
    so they can follow any reducer. ``mlp_hidden=0`` picks the paper's width (d/4, or d/2 below
    d=1024). Needs trained weights (``--adapter``): without them running it is refused, unless
    ``untrained=true`` asks for freshly initialised modules (seed 0) on purpose (tests, ablations).
    Proxies must be fewer than the image tokens they stand for (spatial: ``factor >= 2``;
    non-spatial: ``proxies`` below each crop's or image's tokens), and the ProxyV layers must cost less
    than the layers they replace.

    ``control`` is not ProxyV: the trained control of a task-trained adapter ("vanilla-ft"). Its layers
    are ordinary, and each image token gets a residual branch with the same VisionMLP weights (its own
    input and its layer output as guidance; the output projection starts at zero, so it starts as the
    vanilla model). It saves nothing; trained like the adapter, it shows what the extra parameters and
    training alone bring.
    """

    layer: int = 12
    variant: Literal["spatial", "nonspatial", "control"] = "spatial"
    factor: int = 4
    proxies: int = 36
    mlp_hidden: int = 0
    untrained: bool | None = None

    def __post_init__(self) -> None:
        if self.untrained is False:  # the default, written out: one canonical form
            object.__setattr__(self, "untrained", None)
        if self.factor < 1:
            raise ValueError(f"factor={self.factor} must be an integer >= 1 (4 resizes 24x24 to 6x6)")
        if self.proxies < 1:
            raise ValueError(f"proxies={self.proxies} must be an integer >= 1")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden={self.mlp_hidden} must be >= 0 (0 = the paper's width)")
        if self.layer < 0:
            raise ValueError(f"layer={self.layer} must be an integer >= 0")

    @property
    def is_control(self) -> bool:  # type: ignore[override]
        return self.variant == "control"

    def check_input(self, n: int, grids: Grids) -> None:
        if self.variant == "control":
            return
        if self.variant == "spatial":
            if self.proxies != 36 and self.proxies > n:  # unused by the spatial variant: never beyond n
                raise ValueError(f"proxies={self.proxies} is more than the {n} image tokens this stage "
                                 "receives (and spatial ProxyV takes its proxies from factor, not proxies); "
                                 f"give factor=F, or variant=nonspatial with proxies < {n}")
            count = self.proxy_count(n, grids)
            if count >= n:
                raise ValueError(f"factor={self.factor} makes {count} proxies of the {n} image tokens this "
                                 "stage receives, no fewer; give factor >= 2 (paper: 4, 576 tokens to 36)")
            return
        groups = len(grids) if grids else 1
        each = n // groups
        if self.proxies >= each:
            unit = "crop" if groups > 1 else "image"
            raise ValueError(f"proxies={self.proxies} per {unit} is not fewer than the {each} image tokens "
                             f"each {unit} brings to this stage; give proxies < {each} (paper: 36 of 576)")

    def saving_fix(self, n: int, grids: Grids) -> str:
        """How to make a ProxyV stage cheaper than the layers it replaces."""
        if self.variant == "spatial":
            return f"give a larger factor than {self.factor} (fewer proxies)"
        return f"give fewer proxies than {self.proxies}, or a smaller mlp_hidden"

    @property
    def requires_grid(self) -> bool:  # type: ignore[override]
        return self.variant == "spatial"

    @property
    def grid_fix(self) -> str:
        return "use variant=nonspatial, which needs no grid"

    def output_count(self, n: int, grids: Grids) -> int:
        return n

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        return state

    def proxy_grids(self, grids: Grids) -> tuple[tuple[int, int], ...]:
        """Side of the proxy grid of every crop (spatial variant)."""
        if grids is None:
            raise ValueError("spatial ProxyV needs the token grid")
        return tuple((math.ceil(h / self.factor), math.ceil(w / self.factor)) for h, w in grids)

    def proxy_count(self, n: int, grids: Grids, groups: int = 1) -> int:
        """Proxies made from ``n`` image tokens (``groups``: crops or images when the grid is gone)."""
        if self.variant == "spatial":
            return sum(h * w for h, w in self.proxy_grids(grids))
        if self.variant == "control":
            return 0
        return self.proxies * (len(grids) if grids else groups)

    def width(self, hidden_size: int) -> int:
        """Hidden width of the light MLP."""
        if self.mlp_hidden:
            return self.mlp_hidden
        return hidden_size // 4 if hidden_size >= 1024 else hidden_size // 2


def proxyv_stage(plan: Any) -> Any:
    """A plan's ProxyV stage when it starts at a real decoder layer (else None)."""
    stage = next((s for s in plan.stages if s.placement == "proxyv"), None)
    return stage if stage is not None and stage.layer < plan.geometry.num_layers else None
