"""The objects every reducer reads and returns: :class:`TokenState`, :class:`Signals`, :class:`Reducer`.

A reducer is a small frozen dataclass whose fields are its parameters. It maps one sample's (or
one image's) visual tokens, carried in a :class:`TokenState`, plus the signals it declared in
``needs``, to a new :class:`TokenState`. It never sees a model, a hook or the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .signals import (
    LLM_SIGNALS,
    POSITION_POLICIES,
    SIGNALS,
    UNALIGNED_SIGNALS,
    VISION_SIGNALS,
    Signals,
)
from .state import Grid, Grids, TokenState

#: the placements lmmsqueeze registers (``lmmsqueeze.compose.placements``; a plugin may add more)
BUILTIN_PLACEMENTS = ("vision", "projector", "llm", "proxyv")
FAMILIES = ("pruning", "merging", "pooling", "proxy")

def check_keep(value: float, name: str = "keep") -> None:
    """Refuse a token budget that is neither a count (int >= 1) nor a fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number: a count (integer >= 1) or a fraction in (0, 1]")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{name}={value} is not finite; give a fraction in (0, 1] or a count >= 1")
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"{name}={value} is a float outside (0, 1]; give a fraction in (0, 1] "
                f"or an integer count such as {name}={max(1, round(value))}"
            )
    elif value < 1:
        raise ValueError(f"{name}={value} keeps no token; give a count >= 1 or a fraction in (0, 1]")


def check_count(value: float | None, n: int, name: str = "keep") -> None:
    """Refuse a count (an int) larger than the ``n`` image tokens a stage receives (fractions pass)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > n:
        raise ValueError(f"{name}={value} is more than the {n} image tokens this stage receives; give "
                         f"{name} <= {n} or a fraction in (0, 1]")


def resolve_keep(value: float, n: int) -> int:
    """Number of tokens a budget keeps out of ``n``: a count as is, a fraction rounded to the nearest count
    (ties to even, as Python's ``round`` in the released FastV and DivPrune code), at least 1."""
    if isinstance(value, float):
        return max(1, min(n, round(value * n)))
    return min(int(value), n)


def wide(x: Tensor) -> Tensor:
    """``x`` in at least float32 (a double-precision model keeps its precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def top_k_slots(scores: Tensor, k: int) -> Tensor:
    """Slots of the ``k`` highest scores; ties go to the lower slot (stable and deterministic)."""
    order = torch.sort(wide(scores), descending=True, stable=True).indices
    return order[:k]


def apportion(k: int, sizes: list[int]) -> list[int]:
    """Split a budget of ``k`` tokens over groups of ``sizes`` in proportion to their sizes (largest
    remainder; ties to the earlier group), so the shares sum to ``k`` and none exceeds its group."""
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} tokens")
    if total == 0:
        return [0] * len(sizes)
    exact = [k * s / total for s in sizes]
    shares = [min(int(e), s) for e, s in zip(exact, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    left = k - sum(shares)
    while left > 0:
        for i in order:
            if left and shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
    return shares


def top_k_per_group(scores: Tensor, k: int, groups: Tensor) -> Tensor:
    """Slots of the top scores within each group, the budget ``k`` split by :func:`apportion`."""
    ids = torch.unique(groups)
    members = [torch.nonzero(groups == g).flatten() for g in ids]
    shares = apportion(k, [len(m) for m in members])
    picked = [m[top_k_slots(scores[m], share)] for m, share in zip(members, shares, strict=True)]
    return torch.cat(picked) if picked else scores.new_empty(0, dtype=torch.long)


class Reducer:
    """Base class of every reducer. Subclasses are frozen dataclasses registered with
    :func:`lmmsqueeze.register_reducer`, which sets the class-level metadata below."""

    name: ClassVar[str]
    family: ClassVar[str]
    placements: ClassVar[tuple[str, ...]]
    needs: ClassVar[frozenset[str]]
    #: signals read when the model provides them (e.g. VisionZip's [CLS] feature), never required
    optional: ClassVar[frozenset[str]] = frozenset()
    keeps_grid: ClassVar[bool]
    cite: ClassVar[str] = ""
    #: the released code the defaults reproduce ("owner/repo, path::function") and how faithfully:
    #: "exact", or "approx: <what differs and why>"
    code: ClassVar[str] = ""
    fidelity: ClassVar[str] = ""
    #: the position policy of an ``llm`` stage when the pipeline does not give ``positions=`` (the
    #: released code's); stages before the LLM renumber by default, as every released pre-LLM method does
    llm_positions: ClassVar[str] = "keep"
    #: set by reducers that read the token grid (the validator refuses them after a grid breaker)
    requires_grid: ClassVar[bool] = False

    def bind(self, available: frozenset[str]) -> Reducer:
        """This reducer as it runs on a model that provides the ``available`` signals (a reducer with
        ``optional`` signals may plan differently without them); the compiler plans with it."""
        return self

    def observed(self, count: int) -> Reducer:
        """An adaptive reducer as it ran when it kept ``count`` tokens (its count and cost as a plan
        takes them); others are what they are."""
        return self

    @property
    def is_control(self) -> bool:
        """True for a documented control that keeps every token on purpose (``keep=1.0``; ProxyV's
        ``variant=control``): a plan with one may cost more than the vanilla model (its signals, its
        modules); the compiler refuses any other plan that does."""
        keep = getattr(self, "keep", None)
        return isinstance(keep, float) and keep == 1.0

    @property
    def adaptive(self) -> bool:
        """True when the number of tokens out depends on the data (e.g. PruMerge+'s outlier count):
        :meth:`output_count` is then an estimate for planning and the runtime reports what ran."""
        return False

    def check_input(self, n: int, grids: Grids) -> None:
        """Refuse parameters that do not fit the ``n`` tokens (and ``grids``) this stage receives, with a
        ``ValueError`` naming the parameter, the count received and the fix. The compiler calls it with
        the planned counts, before :meth:`output_count`; the runtime never does. By default a ``keep``
        count larger than ``n`` is refused; a reducer with other counts (e.g. VisionZip's ``dominant``)
        extends it."""
        check_count(getattr(self, "keep", None), n)

    def output_count(self, n: int, grids: Grids) -> int:
        """Tokens out for ``n`` tokens in (per image at vision/projector placement, per sample at llm);
        an estimate when :attr:`adaptive`."""
        raise NotImplementedError

    def output_grids(self, grids: Grids) -> Grids:
        """The grid of the output, or None when this reducer breaks the order."""
        return grids if self.keeps_grid else None

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        """Map a state to the reduced state. Must return ``output_count(state.n, state.grids)`` tokens."""
        raise NotImplementedError

    def cost_macs(self, n: int, dim: int, grids: Grids) -> int:
        """Multiply-accumulates of the matrix products this reducer performs on ``n`` tokens of width
        ``dim`` (e.g. a similarity matrix: ``n * n * dim``). The cost model adds it to the plan and a
        test checks it against ``torch.utils.flop_counter``; elementwise work is not counted.

        ``dim`` is the width of the rows the products read: the signal :meth:`metric_signal` names,
        or the tokens' hidden states at the stage's placement."""
        return 0

    def metric_signal(self) -> str | None:
        """The signal whose rows :meth:`cost_macs` multiplies (e.g. ``"vision_keys"``), or None when
        the products read the tokens' hidden states."""
        return None

    def substages(self) -> list[Reducer] | None:
        """For a method that acts at several places (e.g. PyramidDrop at layers 8, 16, 24): the reducers
        to run in order, each with its own placement. None for a single-placement reducer."""
        return None

    @property
    def placement_layer(self) -> int | None:
        """The decoder layer this stage runs at, when its parameters name one."""
        return getattr(self, "layer", None)


@dataclass(frozen=True)
class ScoredPruner(Reducer):
    """A pruner that only scores tokens: the kept set is the top-``keep`` scores, in original order.

    A subclass whose method selects within each crop (``per_crop = True``) takes its top scores in
    every crop of an image (LLaVA-NeXT's base crop and sub-crop grid), the budget split across crops
    by their token counts; with one crop nothing changes.
    """

    per_crop: ClassVar[bool] = False
    keep: int | float = 0.5

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def score(self, state: TokenState, signals: Signals) -> Tensor:
        """``[N]`` importance of every current token; higher is kept first."""
        raise NotImplementedError

    def output_count(self, n: int, grids: Grids) -> int:
        return resolve_keep(self.keep, n)

    def reduce(self, state: TokenState, signals: Signals) -> TokenState:
        k = self.output_count(state.n, state.grids)
        if k >= state.n:
            return state
        if self.per_crop:
            return state.select(top_k_per_group(self.score(state, signals), k, state.crop_ids))
        return state.select(top_k_slots(self.score(state, signals), k))


def check_layer(layer: int | None, minimum: int = 0, why: str = "") -> None:
    if layer is None:
        return
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"layer={layer!r} must be an integer >= {minimum}{reason}")


__all__ = [
    "FAMILIES",
    "LLM_SIGNALS",
    "BUILTIN_PLACEMENTS",
    "POSITION_POLICIES",
    "SIGNALS",
    "UNALIGNED_SIGNALS",
    "VISION_SIGNALS",
    "Grid",
    "Grids",
    "Reducer",
    "ScoredPruner",
    "Signals",
    "TokenState",
    "apportion",
    "check_count",
    "check_keep",
    "check_layer",
    "resolve_keep",
    "top_k_per_group",
    "top_k_slots",
]
