"""Searchable parameters: a reducer declares the range `lmmsqueeze tune` searches next to the field.

    keep: int | float = searchable(0.5, low=0.02, high=0.9, log=True)
    layer: int = searchable(2, low=1, high=LAST_LAYER)
    metric: Literal["keys", "hidden"] = searchable("keys", choices=("keys", "hidden"))

``searchable`` is a :func:`dataclasses.field` with the range in its metadata (key ``"search"``), so the
dataclass, its default and the pipeline language are unchanged. A range is an int range, a float range
(linear or ``log``) or a list of choices; ``high=LAST_LAYER`` stands for the model's last decoder
layer. Ranges stay within the reducer's own checks (``__post_init__`` and ``check_input``); the
validator still refuses a combination that does not fit a model (the tuner then rejects it unrun).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

#: ``high=LAST_LAYER``: the model's last decoder layer (``num_layers - 1``)
LAST_LAYER = "last"
#: the levels per numeric range of the discretised grid the tuner compares itself with
GRID_LEVELS = 5


@dataclass(frozen=True)
class SearchRange:
    """What the tuner may give one parameter: ``kind`` is ``int``, ``float`` or ``choice``."""

    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "choice":
            if not self.choices:
                raise ValueError("a choice range needs at least one choice")
            return
        if self.kind not in ("int", "float"):
            raise ValueError(f"search range kind {self.kind!r} must be int, float or choice")
        high = self.high
        if isinstance(high, str) and high != LAST_LAYER:
            raise ValueError(f"high={high!r} must be a number or LAST_LAYER")
        for name, value in (("low", self.low), ("high", high)):
            if value == LAST_LAYER:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} of a search range must be a finite number")
            if self.kind == "int" and not isinstance(value, int):
                raise ValueError(f"{name}={value!r} of an int search range must be an integer")
        if self.log and (self.low <= 0 or self.kind == "choice"):
            raise ValueError("a log range needs low > 0")
        if high != LAST_LAYER and self.low > high:
            raise ValueError(f"low={self.low} is above high={high}")

    def resolve(self, num_layers: int) -> SearchRange:
        """The range on a model with ``num_layers`` decoder layers (``LAST_LAYER`` replaced)."""
        if self.high == LAST_LAYER:
            return dataclasses.replace(self, high=max(self.low, num_layers - 1))
        return self

    def levels(self, count: int = GRID_LEVELS) -> list[Any]:
        """The grid's values: every choice; every integer when there are at most ``count``, else
        ``count`` evenly spaced ones; ``count`` evenly spaced floats (geometrically for ``log``)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            span = self.high - self.low + 1
            if span <= count:
                return list(range(self.low, self.high + 1))
            return sorted({round(self.low + i * (self.high - self.low) / (count - 1)) for i in range(count)})
        if self.low == self.high:
            return [float(self.low)]
        if self.log:
            ratio = self.high / self.low
            return [round(self.low * ratio ** (i / (count - 1)), 6) for i in range(count)]
        return [round(self.low + i * (self.high - self.low) / (count - 1), 6) for i in range(count)]

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        scale = " (log)" if self.log else ""
        return f"{self.kind} in [{self.low}, {self.high}]{scale}"


def searchable(default: Any, *, low: Any = None, high: Any = None, log: bool = False,
               choices: tuple[Any, ...] | list[Any] | None = None) -> Any:
    """A dataclass field with ``default`` whose search range is declared: ``low``..``high`` (ints when
    both are ints, ``high=LAST_LAYER`` for a layer), or ``choices``."""
    if choices is not None:
        spec = SearchRange("choice", choices=tuple(choices))
    else:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high) if v != LAST_LAYER)
        spec = SearchRange("int" if ints else "float", low if ints else float(low),
                           high if ints or high == LAST_LAYER else float(high), log)
    return dataclasses.field(default=default, metadata={"search": spec})


def search_ranges(cls: type) -> dict[str, SearchRange]:
    """The searchable parameters a reducer class declares, by name, in field order."""
    return {f.name: f.metadata["search"] for f in dataclasses.fields(cls)
            if f.init and isinstance(f.metadata.get("search"), SearchRange)}


__all__ = ["GRID_LEVELS", "LAST_LAYER", "SearchRange", "search_ranges", "searchable"]
