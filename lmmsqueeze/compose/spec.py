"""The pipeline language: parse, format, load from files, expand sweep lists.

Grammar::

    pipeline := "" | "none" | stage ( "|" stage )*
    stage    := NAME [ "(" [ arg ( "," arg )* ] ")" ]
    arg      := NAME "=" value
    value    := INT | FLOAT | STRING | "true" | "false" | NAME | "[" [ value ( "," value )* ] "]"

``1`` is an integer and ``1.0`` a float, which matters for ``keep`` (a count or a fraction).
``@file.yaml`` / ``@file.json`` hold the same pipeline as a list of ``{name: ..., key: value}``.
This module touches no tensors and no registry: it only reads and writes text.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import PipelineError

Value = int | float | bool | str | list


@dataclass(frozen=True)
class StageSpec:
    """One stage as written: a name and its parameters (not yet checked against the registry)."""

    name: str
    params: dict[str, Value] = field(default_factory=dict)

    def format(self) -> str:
        if not self.params:
            return self.name
        args = ", ".join(f"{k}={format_value(v)}" for k, v in self.params.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class PipelineSpec:
    """An ordered list of stages; the empty spec is the vanilla model."""

    stages: tuple[StageSpec, ...] = ()

    def format(self) -> str:
        return " | ".join(s.format() for s in self.stages) if self.stages else "none"

    def __str__(self) -> str:
        return self.format()

    @property
    def has_lists(self) -> bool:
        return any(isinstance(v, list) for s in self.stages for v in s.params.values())


def format_value(value: Value) -> str:
    """The canonical text of one value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        if _BARE.fullmatch(value) and value not in _KEYWORDS:
            return value
        return json.dumps(value)
    raise PipelineError(f"value {value!r} of type {type(value).__name__} cannot appear in a pipeline")


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")
_KEYWORDS = {"true", "false", "none", "nan", "inf"}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
      | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<name>[A-Za-z_][A-Za-z0-9_\-./]*)
      | (?P<punct>[|(),=\[\]])
    )""",
    re.VERBOSE,
)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                col = pos + len(text[pos:]) - len(text[pos:].lstrip()) + 1
                raise self.error(f"unexpected character {text[col - 1]!r}", col)
            kind = m.lastgroup
            start = m.start(kind)
            self.tokens.append((kind, m.group(kind), start + 1))
            pos = m.end()
        self.i = 0

    def error(self, message: str, col: int | None = None) -> PipelineError:
        where = f" at column {col}" if col else " at the end"
        return PipelineError(f"cannot parse pipeline {self.text.strip()!r}{where}: {message}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None, kind: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise self.error(f"expected {expected or kind}")
        if (expected is not None and tok[1] != expected) or (kind is not None and tok[0] != kind):
            raise self.error(f"expected {expected or kind}, found {tok[1]!r}", tok[2])
        self.i += 1
        return tok

    def pipeline(self) -> PipelineSpec:
        if not self.tokens or (len(self.tokens) == 1 and self.tokens[0][1].lower() == "none"):
            return PipelineSpec()
        stages = [self.stage()]
        while self.peek() is not None:
            self.take("|")
            stages.append(self.stage())
        return PipelineSpec(tuple(stages))

    def stage(self) -> StageSpec:
        tok = self.peek()
        if tok is None or tok[0] != "name":
            raise self.error("expected a stage name", tok[2] if tok else None)
        name = self.take(kind="name")[1]
        params: dict[str, Value] = {}
        nxt = self.peek()
        if nxt is not None and nxt[1] == "(":
            self.take("(")
            if self.peek() is not None and self.peek()[1] == ")":
                self.take(")")
                return StageSpec(name, params)
            while True:
                key_tok = self.peek()
                if key_tok is None or key_tok[0] != "name":
                    raise self.error("expected a parameter name", key_tok[2] if key_tok else None)
                key = self.take(kind="name")[1]
                if key in params:
                    raise self.error(f"parameter {key!r} of stage {name!r} is given twice", key_tok[2])
                self.take("=")
                params[key] = self.value()
                sep = self.peek()
                if sep is not None and sep[1] == ",":
                    self.take(",")
                    continue
                self.take(")")
                break
        return StageSpec(name, params)

    def value(self) -> Value:
        tok = self.peek()
        if tok is None:
            raise self.error("expected a value")
        kind, text, col = tok
        if text == "[":
            self.take("[")
            items: list[Value] = []
            if self.peek() is not None and self.peek()[1] == "]":
                raise self.error("a list needs at least one value", col)
            while True:
                item = self.value()
                if isinstance(item, list):
                    raise self.error("lists cannot be nested", col)
                items.append(item)
                sep = self.peek()
                if sep is not None and sep[1] == ",":
                    self.take(",")
                    continue
                self.take("]")
                return items
        self.i += 1
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "str":
            return bytes(text[1:-1], "utf-8").decode("unicode_escape")
        if kind == "name":
            low = text.lower()
            if low in ("true", "false"):
                return low == "true"
            if low in ("nan", "inf"):
                return float(low)
            return text
        raise self.error(f"expected a value, found {text!r}", col)


def parse_pipeline(text: str | PipelineSpec | None) -> PipelineSpec:
    """Parse the pipeline language (or ``@file.yaml|json``) into a :class:`PipelineSpec`."""
    if isinstance(text, PipelineSpec):
        return text
    if text is None:
        return PipelineSpec()
    if not isinstance(text, str):
        raise PipelineError(f"a pipeline must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if stripped.startswith("@"):
        return load_pipeline_file(stripped[1:])
    return _Parser(stripped).pipeline()


def load_pipeline_file(path: str | Path) -> PipelineSpec:
    """Read a pipeline from YAML or JSON: a list of ``{name: ..., key: value}`` (or ``{pipeline: [...]}``)."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"pipeline file {str(p)!r} does not exist; write `@path/to/pipeline.yaml`")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise PipelineError(f"pipeline file {str(p)!r} must end in .yaml, .yml or .json")
    except ValueError as exc:
        if isinstance(exc, PipelineError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"cannot read pipeline file {str(p)!r}: {first}") from None
    return pipeline_from_data(data, source=str(p))


def pipeline_from_data(data: Any, source: str = "pipeline data") -> PipelineSpec:
    """Build a spec from plain data: a list of stage mappings, a stage string, or ``{pipeline: ...}``."""
    if isinstance(data, dict) and set(data) <= {"pipeline", "stages"} and len(data) == 1:
        data = next(iter(data.values()))
    if data is None:
        return PipelineSpec()
    if isinstance(data, str):
        return parse_pipeline(data)
    if not isinstance(data, list):
        raise PipelineError(f"{source}: expected a list of stages like [{{name: fastv, keep: 0.5}}]")
    stages = []
    for i, item in enumerate(data, 1):
        if isinstance(item, str):
            stages.extend(parse_pipeline(item).stages)
            continue
        if not isinstance(item, dict) or "name" not in item:
            raise PipelineError(f"{source}: stage {i} must be a mapping with a `name` key, got {item!r}")
        params = {k: v for k, v in item.items() if k != "name"}
        for key, value in params.items():
            ok = isinstance(value, (int, float, bool, str)) or (
                isinstance(value, list) and all(isinstance(v, (int, float, bool, str)) for v in value)
            )
            if not ok:
                raise PipelineError(f"{source}: stage {i} ({item['name']}): {key}={value!r} is not a number, "
                                    "string, boolean or list of them")
        stages.append(StageSpec(str(item["name"]), params))
    return PipelineSpec(tuple(stages))


def expand_lists(spec: PipelineSpec) -> list[PipelineSpec]:
    """One pipeline per combination of list values (``keep=[0.25, 0.5]`` gives two pipelines)."""
    slots = [(si, k, v) for si, s in enumerate(spec.stages) for k, v in s.params.items()
             if isinstance(v, list)]
    if not slots:
        return [spec]
    out = []
    for combo in itertools.product(*(v for _, _, v in slots)):
        stages = [StageSpec(s.name, dict(s.params)) for s in spec.stages]
        for (si, k, _), value in zip(slots, combo, strict=True):
            stages[si].params[k] = value
        out.append(PipelineSpec(tuple(stages)))
    return out
