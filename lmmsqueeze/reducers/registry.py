"""The reducer registry: ``register_reducer``, ``list_reducers``, ``get_reducer``, ``create_reducer``.

Built-in reducers register themselves when :mod:`lmmsqueeze.reducers` is imported. Third-party
reducers are found through the entry-point group ``lmmsqueeze.reducers``: each entry point names
a module (or an object inside one) whose import registers its reducers::

    [project.entry-points."lmmsqueeze.reducers"]
    my_reducer = "my_package.my_reducer"

A name can be registered once; a second registration raises unless ``override=True``. A plugin is
loaded whole or not at all: one that fails to import, or registers a name a built-in or an earlier
plugin holds (``override`` does not apply to plugins), is refused alone (its registrations undone)
and named, with its package and error, by ``lmmsqueeze reducers`` and in "unknown stage" errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.metadata
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ..builtins import load_builtins
from ..errors import PipelineError, RegistryError
from .base import BUILTIN_PLACEMENTS, FAMILIES, POSITION_POLICIES, SIGNALS, Reducer

ENTRY_POINT_GROUP = "lmmsqueeze.reducers"

_REGISTRY: dict[str, type[Reducer]] = {}
_PLUGINS_LOADED = False
_PLUGIN_ERRORS: dict[str, str] = {}
_LOADING: str | None = None  # the plugin being imported ("package 'x' (module m)"), while it is

R = TypeVar("R", bound=type[Reducer])


def register_reducer(
    name: str,
    *,
    family: str,
    placements: tuple[str, ...] | list[str],
    needs: tuple[str, ...] | list[str] = (),
    optional: tuple[str, ...] | list[str] = (),
    keeps_grid: bool,
    cite: str = "",
    code: str = "",
    fidelity: str = "",
    llm_positions: str = "keep",
    override: bool = False,
) -> Callable[[R], R]:
    """Class decorator that registers a reducer dataclass under ``name``.

    Args:
        name: the stage name used in pipelines (lower case, letters, digits and ``_``).
        family: one of ``pruning``, ``merging``, ``pooling``.
        placements: where the stage may run: any of ``vision``, ``projector``, ``llm``.
            Without a ``layer`` parameter the first non-``llm`` placement is the default.
        needs: signals the reducer reads (see :data:`lmmsqueeze.reducers.base.SIGNALS`).
        optional: signals it reads when the model provides them (never a reason to refuse a pipeline).
        keeps_grid: whether the output is still a row-major grid per crop.
        cite: one line naming the method's paper.
        code: the released code the defaults reproduce, ``"owner/repo, path::function"``.
        fidelity: ``"exact"``, or ``"approx: <what differs and why>"``.
        llm_positions: the position policy of an ``llm`` stage by default (``keep`` or ``renumber``), as the
            released code does; stages before the LLM renumber by default.
        override: replace an existing registration instead of raising.
    """

    def decorate(cls: R) -> R:
        if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
            raise RegistryError(f"reducer name {name!r} must be a lower-case identifier such as 'my_pruner'")
        if not (isinstance(cls, type) and issubclass(cls, Reducer)):
            raise RegistryError(f"@register_reducer({name!r}) expects a Reducer subclass, got {cls!r}")
        if not dataclasses.is_dataclass(cls):
            raise RegistryError(f"reducer {name!r}: {cls.__name__} must be a @dataclass(frozen=True)")
        if family not in FAMILIES:
            raise RegistryError(f"reducer {name!r}: family {family!r} is not one of {', '.join(FAMILIES)}")
        bad = [p for p in placements if not (isinstance(p, str) and p.isidentifier())]
        if bad or not placements:
            raise RegistryError(
                f"reducer {name!r}: placements {list(placements)} must be a non-empty tuple of placement "
                f"names, e.g. {list(BUILTIN_PLACEMENTS)}"
            )
        unknown = [s for s in (*needs, *optional) if s not in SIGNALS]
        if unknown:
            raise RegistryError(f"reducer {name!r}: unknown signals {unknown}; known: {', '.join(SIGNALS)}")
        if llm_positions not in POSITION_POLICIES:
            raise RegistryError(f"reducer {name!r}: llm_positions={llm_positions!r} is not one of "
                                f"{', '.join(POSITION_POLICIES)}")
        if "llm" in placements and "layer" not in {f.name for f in dataclasses.fields(cls)}:
            raise RegistryError(f"reducer {name!r} declares the llm placement but has no `layer` parameter")
        if name in _REGISTRY and _LOADING and _REGISTRY[name] is not cls:
            other = _REGISTRY[name]
            raise RegistryError(
                f"reducer name {name!r} is taken by {other.__module__}.{other.__qualname__}; a plugin cannot "
                "replace it: give the reducer another name in @register_reducer"
            )
        if name in _REGISTRY and not override and _REGISTRY[name] is not cls:
            other = _REGISTRY[name]
            raise RegistryError(
                f"reducer name {name!r} is already registered by {other.__module__}.{other.__qualname__}; "
                "choose another name or pass override=True"
            )
        _param_specs(cls)  # fail at registration on a parameter type we cannot parse
        cls.name = name
        cls.family = family
        cls.placements = tuple(placements)
        cls.needs = frozenset(needs)
        cls.optional = frozenset(optional)
        cls.keeps_grid = bool(keeps_grid)
        cls.cite = cite
        cls.code = code
        cls.fidelity = fidelity
        cls.llm_positions = llm_positions
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_reducer(name: str) -> None:
    """Remove a registration (for tests and interactive use)."""
    _REGISTRY.pop(name, None)


def _plugin_label(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    package = f"package {dist.name!r}" if dist is not None and dist.name else "an unnamed package"
    return f"{package} (module {ep.value})"


def load_plugins() -> dict[str, str]:
    """Import every ``lmmsqueeze.reducers`` entry point once; returns ``{entry point: "package 'p' (module
    m): Error: message"}`` of the plugins refused. A refused plugin leaves no registration behind."""
    global _PLUGINS_LOADED, _LOADING
    if not _PLUGINS_LOADED:
        _PLUGINS_LOADED = True
        load_builtins()  # the built-in placements and the proxyv stage first
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            before = dict(_REGISTRY)
            _LOADING = _plugin_label(ep)
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not break the built-ins or other plugins
                _REGISTRY.clear()
                _REGISTRY.update(before)
                message = " ".join(str(exc).split()) or "(no message)"
                _PLUGIN_ERRORS[ep.name] = f"{_LOADING}: {type(exc).__name__}: {message}"
            finally:
                _LOADING = None
    return dict(_PLUGIN_ERRORS)


def list_reducers(pattern: str | None = None, family: str | None = None) -> list[str]:
    """Registered names, sorted, optionally filtered by an fnmatch ``pattern`` and a ``family``."""
    load_plugins()
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if family:
        names = [n for n in names if _REGISTRY[n].family == family]
    return names


def get_reducer(name: str) -> type[Reducer]:
    """The reducer class registered under ``name``; a :class:`PipelineError` names the closest ones."""
    load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
                else "run `lmmsqueeze reducers` for the list")
        broken = "".join(f"; plugin {ep!r} failed to load, {why}" for ep, why in _PLUGIN_ERRORS.items())
        raise PipelineError(f"unknown stage {name!r}: {hint}{broken}") from None


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a reducer, as the pipeline language sees it."""

    name: str
    kind: str  # human-readable type, e.g. "int", "float", "int|float", "one of a|b"
    default: Any
    accepts: tuple[Any, ...]  # the parsed type hint's arms

    def coerce(self, value: Any) -> Any:
        for arm in self.accepts:
            ok, out = _coerce_arm(value, arm)
            if ok:
                return out
        raise ValueError(f"{self.name}={_show(value)} is not a valid {self.kind}")


def _coerce_arm(value: Any, arm: Any) -> tuple[bool, Any]:
    if arm is type(None):
        return value is None, None
    if typing.get_origin(arm) is Literal:
        return value in typing.get_args(arm) and not isinstance(value, bool), value
    if arm is bool:
        return isinstance(value, bool), value
    if arm is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if arm is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if arm is str:
        return isinstance(value, str), value
    return False, value


def _kind(arm: Any) -> str:
    if arm is type(None):
        return "none"
    if typing.get_origin(arm) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(arm))
    return getattr(arm, "__name__", str(arm))


def _param_specs(cls: type[Reducer]) -> dict[str, ParamSpec]:
    hints = typing.get_type_hints(cls)
    specs: dict[str, ParamSpec] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        arms = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
        for arm in arms:
            if not (arm in (int, float, bool, str, type(None)) or typing.get_origin(arm) is Literal):
                raise RegistryError(
                    f"reducer {cls.__name__}: parameter {f.name!r} has type {hint!r}; "
                    "use int, float, bool, str, Literal[...] or a union of them"
                )
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise RegistryError(f"reducer {cls.__name__}: parameter {f.name!r} needs a default value")
        specs[f.name] = ParamSpec(f.name, "|".join(_kind(a) for a in arms), default, arms)
    return specs


def reducer_params(name_or_cls: str | type[Reducer]) -> dict[str, ParamSpec]:
    """The parameters of a reducer, by name, with their kinds and defaults."""
    cls = get_reducer(name_or_cls) if isinstance(name_or_cls, str) else name_or_cls
    return _param_specs(cls)


def create_reducer(name: str, **params: Any) -> Reducer:
    """Build a reducer from pipeline parameters, with type and range checks.

    Raises:
        PipelineError: unknown name or parameter, a value of the wrong type or out of range.
    """
    return build_reducer(name, params)


def build_reducer(name: str, params: dict[str, Any], where: str | None = None) -> Reducer:
    """:func:`create_reducer` with the error messages prefixed by ``where`` (default: the name)."""
    cls = get_reducer(name)
    where = where or name
    specs = _param_specs(cls)
    if "layer" in params and "layer" not in specs:
        raise PipelineError(
            f"{where}: {name} does not run inside the LLM (placements: {', '.join(cls.placements)}); "
            f"remove layer={_show(params['layer'])}"
        )
    values: dict[str, Any] = {}
    for key, value in params.items():
        if key not in specs:
            close = difflib.get_close_matches(key, list(specs), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            valid = ", ".join(specs) or "none"
            raise PipelineError(f"{where}: unknown parameter {key!r}; {hint}valid parameters: {valid}")
        if isinstance(value, list):
            raise PipelineError(
                f"{where}: {key}={_show(value)} is a list; lists expand into several pipelines only in a "
                "sweep (`lmmsqueeze sweep`), give one value here"
            )
        try:
            values[key] = specs[key].coerce(value)
        except ValueError as exc:
            raise PipelineError(f"{where}: {exc}") from None
    try:
        return cls(**values)
    except ValueError as exc:
        raise PipelineError(f"{where}: {exc}") from None


def reducer_info(name: str) -> dict[str, Any]:
    """A plain description of a registered reducer (what `lmmsqueeze reducers --json` prints)."""
    cls = get_reducer(name)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return {
        "name": name,
        "family": cls.family,
        "placements": list(cls.placements),
        "needs": sorted(cls.needs),
        "optional": sorted(cls.optional),
        "keeps_grid": cls.keeps_grid,
        "llm_positions": cls.llm_positions,
        "params": {p.name: {"type": p.kind, "default": p.default} for p in _param_specs(cls).values()},
        "summary": " ".join(doc.split()),
        "cite": cls.cite,
        "code": cls.code,
        "fidelity": cls.fidelity,
        "module": cls.__module__,
    }


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)
