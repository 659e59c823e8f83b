"""The search space of `lmmsqueeze tune`: which reducers, at which placements, over which ranges.

By default every registered reducer (plugins too) at every placement it declares, its declared
:func:`~lmmsqueeze.reducers.search.searchable` parameters over their ranges, up to three stages, and
the ProxyV adapters shipped for the model. A space file narrows it::

    max_stages: 2
    placements: [vision, llm]            # only these placements
    adapters: []                         # no ProxyV (default on the bundled model: its shipped adapters)
    reducers:                            # a list of names, or name -> parameter ranges
      fastv: {keep: [0.05, 0.5], layer: [1, 2]}
      visionzip: {}                      # its declared ranges
      tome: {placements: [projector], metric: keys}   # a single value fixes a parameter

A range is ``[low, high]`` (``{low: .., high: .., log: true}`` for a log scale) or, for a parameter of
choices, a list of choices. Every range is checked against the reducer's own bounds (its endpoints are
built as reducers) and layers against the model. No tensors, no model here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..compose.geometry import ModelGeometry
from ..compose.placements import get_placement, placement_names
from ..compose.spec import PipelineSpec, StageSpec, parse_pipeline
from ..errors import LmmsqueezeError
from ..proxyv.attach import BUNDLED_ADAPTERS, adapter_path, adapter_pipeline
from ..reducers.registry import build_reducer, get_reducer, list_reducers, reducer_params
from ..reducers.search import SearchRange, search_ranges

DEFAULT_MAX_STAGES = 3
MAX_STAGES_LIMIT = 6
SPACE_KEYS = ("reducers", "max_stages", "placements", "adapters")


class SpaceError(LmmsqueezeError, ValueError):
    """A search space (or space file) that cannot be used."""


@dataclass(frozen=True)
class Option:
    """One reducer at one placement, with the ranges searched and the parameters held fixed."""

    reducer: str
    placement: str
    ranges: dict[str, SearchRange] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.reducer}@{self.placement}"

    def grid_size(self) -> int:
        return math.prod(len(r.levels()) for r in self.ranges.values())


@dataclass(frozen=True)
class Space:
    options: tuple[Option, ...]
    max_stages: int = DEFAULT_MAX_STAGES
    adapters: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"max_stages": self.max_stages, "adapters": list(self.adapters),
                "options": {o.key: {"ranges": {k: r.describe() for k, r in o.ranges.items()},
                                    "fixed": o.fixed} for o in self.options}}

    def digest(self) -> str:
        """A short hash of the space (part of the study's name: another space is another study)."""
        text = json.dumps(self.describe(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def option(self, key: str) -> Option:
        return next(o for o in self.options if o.key == key)

    def grid_size(self) -> int:
        """Candidates of the discretised grid (see :meth:`SearchRange.levels`): every chain of 0 to
        ``max_stages`` stages, each stage any option at any grid point, times each ProxyV choice."""
        per_stage = sum(o.grid_size() for o in self.options)
        chains = sum(per_stage ** k for k in range(self.max_stages + 1))
        return chains * (1 + len(self.adapters))


def _where(source: str, *parts: str) -> str:
    return ": ".join((source, ".".join(parts))) if parts else source


def _layered(placement: str) -> bool:
    return get_placement(placement).layered


def _reducer_options(name: str, geometry: ModelGeometry, allowed: list[str] | None, overrides: dict[str, Any],
                     source: str) -> list[Option]:
    cls = get_reducer(name)
    if cls.family == "proxy":
        raise SpaceError(f"{_where(source, 'reducers', name)}: ProxyV runs with a trained adapter; list it "
                         "under `adapters:` (e.g. adapters: [bundled:proxyv-spatial])")
    specs = reducer_params(name)
    declared = [p for p in cls.placements if not get_placement(p).exclusive]
    wanted = overrides.pop("placements", None)
    if wanted is not None:
        if isinstance(wanted, str):
            wanted = [wanted]
        bad = [p for p in wanted if p not in declared]
        if not isinstance(wanted, list) or bad or not wanted:
            raise SpaceError(f"{_where(source, 'reducers', name, 'placements')}: {wanted!r} must list "
                             f"placements {name} declares: {', '.join(declared)}")
        declared = [p for p in declared if p in wanted]
    if allowed is not None:
        declared = [p for p in declared if p in allowed]
    ranges = {k: r.resolve(geometry.num_layers) for k, r in search_ranges(cls).items()}
    fixed: dict[str, Any] = {}
    for param, value in overrides.items():
        where = _where(source, "reducers", name, str(param))
        if param not in specs:
            raise SpaceError(f"{where}: {name} has no parameter {param!r}; parameters: {', '.join(specs)}")
        got = _parse_range(where, name, param, value, ranges.get(param), specs[param].accepts, geometry)
        if isinstance(got, SearchRange):
            ranges[param] = got
        else:
            ranges.pop(param, None)
            fixed[param] = got
    options = []
    for placement in declared:
        mine = dict(ranges)
        if _layered(placement):
            mine.setdefault("layer", SearchRange("int", 1, max(1, geometry.num_layers - 1)))
        else:
            mine.pop("layer", None)
        options.append(Option(name, placement, mine, {k: v for k, v in fixed.items()
                                                        if k != "layer" or _layered(placement)}))
    return options


def _parse_range(where: str, name: str, param: str, value: Any, declared: SearchRange | None,
                 accepts: tuple[Any, ...], geometry: ModelGeometry) -> SearchRange | Any:
    """A space file's value for one parameter: a range or a fixed value, checked by building reducers."""
    def check(v: Any) -> Any:
        if param == "layer" and isinstance(v, int) and not isinstance(v, bool) and v >= geometry.num_layers:
            raise SpaceError(f"{where}: layer {v} is beyond the model's {geometry.num_layers} layers "
                             f"(0..{geometry.num_layers - 1})")
        try:
            reducer = build_reducer(name, {param: v}, name)
        except LmmsqueezeError as exc:
            raise SpaceError(f"{where}: {v!r} is outside {name}'s bounds ({exc})") from None
        return getattr(reducer, param)

    numeric = any(a in (int, float) for a in accepts)
    choice = (declared is not None and declared.kind == "choice") or not numeric
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(value):
            raise SpaceError(f"{where}: a range mapping needs `low` and `high` (and optionally `log`), "
                             f"not {sorted(map(str, value))}")
        low, high, log = value["low"], value["high"], value.get("log", False)
    elif isinstance(value, list) and choice:
        if not value:
            raise SpaceError(f"{where}: give at least one choice")
        return SearchRange("choice", choices=tuple(check(v) for v in value))
    elif isinstance(value, list):
        if len(value) != 2:
            raise SpaceError(f"{where}: {value!r} must be a range [low, high] (or one value to fix it)")
        low, high = value
        log = bool(declared.log) if declared is not None else False
    else:
        return check(value)
    for v in (low, high):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpaceError(f"{where}: range bounds must be numbers, not {v!r}")
    if low > high:
        raise SpaceError(f"{where}: low {low} is above high {high}; give [low, high]")
    low, high = check(low), check(high)
    ints = isinstance(low, int) and isinstance(high, int) and int in accepts
    try:
        return SearchRange("int" if ints else "float", low if ints else float(low),
                           high if ints else float(high), bool(log) and not ints)
    except ValueError as exc:
        raise SpaceError(f"{where}: {exc}") from None


def default_adapters(model: str) -> tuple[str, ...]:
    """The ProxyV adapters shipped for ``model`` (the bundled model's; none for others)."""
    if str(model) != "bundled":
        return ()
    return tuple(f"bundled:{a}" for a in BUNDLED_ADAPTERS
                 if (adapter_path(f"bundled:{a}") / "adapter_config.json").is_file())


def build_space(data: dict[str, Any] | None, model: str, geometry: ModelGeometry,
                source: str = "space") -> Space:
    """A :class:`Space` from a space file's data (None: the default space)."""
    data = dict(data or {})
    unknown = sorted(map(str, set(data) - set(SPACE_KEYS)))
    if unknown:
        raise SpaceError(f"{source}: unknown keys {unknown}; valid: {', '.join(SPACE_KEYS)}")
    max_stages = data.get("max_stages", DEFAULT_MAX_STAGES)
    if (isinstance(max_stages, bool) or not isinstance(max_stages, int)
            or not 0 <= max_stages <= MAX_STAGES_LIMIT):
        raise SpaceError(f"{_where(source, 'max_stages')}: {max_stages!r} must be an integer from 0 to "
                         f"{MAX_STAGES_LIMIT}")
    allowed = data.get("placements")
    if allowed is not None:
        known = [p for p in placement_names() if not get_placement(p).exclusive]
        if not isinstance(allowed, list) or not allowed or not all(isinstance(p, str) for p in allowed):
            raise SpaceError(f"{_where(source, 'placements')}: give a list of placements, e.g. [vision, llm]")
        for p in allowed:
            try:
                get_placement(p)
            except LmmsqueezeError:
                raise SpaceError(f"{_where(source, 'placements')}: unknown placement {p!r}; known: "
                                 f"{', '.join(known)}") from None
    reducers = data.get("reducers")
    if reducers is None:
        entries: dict[str, Any] = {n: {} for n in list_reducers() if get_reducer(n).family != "proxy"}
    elif isinstance(reducers, list) and all(isinstance(r, str) for r in reducers) and reducers:
        entries = {r: {} for r in reducers}
    elif isinstance(reducers, dict) and reducers and all(isinstance(v, dict) or v is None
                                                         for v in reducers.values()):
        entries = {str(k): dict(v or {}) for k, v in reducers.items()}
    else:
        raise SpaceError(f"{_where(source, 'reducers')}: give a list of reducer names or a mapping of "
                         "names to parameter ranges, e.g. {fastv: {keep: [0.05, 0.5]}}")
    options: list[Option] = []
    for name, overrides in entries.items():
        try:
            get_reducer(name)
        except LmmsqueezeError as exc:
            raise SpaceError(f"{_where(source, 'reducers')}: {exc}") from None
        options += _reducer_options(name, geometry, allowed, overrides, source)
    adapters = data.get("adapters", list(default_adapters(model)))
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise SpaceError(f"{_where(source, 'adapters')}: give a list of ProxyV adapters (directories or "
                         "bundled:<name>), or [] for none")
    for a in adapters:
        try:
            adapter_stage(a)
        except LmmsqueezeError as exc:
            raise SpaceError(f"{_where(source, 'adapters')}: {exc}") from None
    if not options and not adapters:
        raise SpaceError(f"{source}: the space is empty (no reducer at an allowed placement, no adapter)")
    return Space(tuple(options), max_stages, tuple(adapters))


def load_space(path: str | Path, model: str, geometry: ModelGeometry) -> Space:
    """Read a space file (YAML); every problem is one :class:`SpaceError` naming the file and the key."""
    p = Path(path)
    where = f"space file {str(p)!r}"
    if not p.is_file():
        raise SpaceError(f"{where} does not exist" if not p.exists() else f"{where} is not a file")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise SpaceError(f"{where} is not UTF-8 text; write the space as YAML") from None
    except (yaml.YAMLError, OSError) as exc:
        raise SpaceError(f"{where} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpaceError(f"{where} must be a mapping with any of {', '.join(SPACE_KEYS)}")
    return build_space(data, model, geometry, where)


def adapter_stage(adapter: str) -> StageSpec:
    """The proxyv stage of the pipeline an adapter was trained for."""
    stages = [s for s in parse_pipeline(adapter_pipeline(adapter)).stages if s.name == "proxyv"]
    if not stages:
        raise SpaceError(f"adapter {adapter!r} records no proxyv stage in its pipeline")
    return stages[0]


def _value(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def assemble(stages: list[tuple[Option, dict[str, Any]]], adapter: str | None) -> str:
    """The pipeline string of chosen stages, in the order they run (placement order, then layer),
    with the adapter's proxyv stage last."""
    def order(item: tuple[Option, dict[str, Any]]) -> tuple[int, int]:
        option, params = item
        return get_placement(option.placement).order, params.get("layer") or 0

    specs = []
    for option, params in sorted(stages, key=order):
        values = {k: _value(v) for k, v in {**option.fixed, **params}.items()}
        cls = get_reducer(option.reducer)
        pre = [p for p in cls.placements if get_placement(p).before_llm]
        if not _layered(option.placement) and pre and option.placement != pre[0]:
            values["at"] = option.placement
        specs.append(StageSpec(option.reducer, values))
    if adapter:
        specs.append(adapter_stage(adapter))
    return PipelineSpec(tuple(specs)).format() or "none"


__all__ = ["Option", "Space", "SpaceError", "adapter_stage", "assemble", "build_space", "default_adapters",
           "load_space"]
