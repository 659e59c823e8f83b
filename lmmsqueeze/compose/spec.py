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
        if _BARE.fullmatch(value) and value.lower() not in _KEYWORDS:
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
        return PipelineError(f"cannot parse pipeline {clip(self.text.strip(), col)}{where}: {message}")

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
            return _unescape(text[1:-1], lambda why: self.error(why, col))
        if kind == "name":
            low = text.lower()
            if low in ("true", "false"):
                return low == "true"
            if low in ("nan", "inf"):
                return float(low)
            return text
        raise self.error(f"expected a value, found {text!r}", col)


#: escapes a quoted value may hold: JSON's (what the canonical form writes) and \'
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}


def _unescape(body: str, error: Any) -> str:
    """The text of a quoted value; an escape outside :data:`_ESCAPES` is refused through ``error``."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1:i + 2]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2:i + 6]):
            out.append(chr(int(body[i + 2:i + 6], 16)))
            i += 6
        else:
            raise error(f"bad escape {clip(body[i:i + 6])} in a quoted value; valid escapes: "
                        "\\\\ \\\" \\' \\/ \\b \\f \\n \\r \\t \\uXXXX (write \\\\ for a backslash)")
    # \uXXXX pairs (JSON's form of characters beyond U+FFFF) join into one character
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


#: how much of a user's text an error message echoes
CLIP = 200


def clip(text: str, around: int | None = None, limit: int = CLIP, quote: bool = True) -> str:
    """``repr(text)`` (``text`` itself when not ``quote``), cut to about ``limit`` characters with an
    ellipsis (centred on column ``around`` when given), so that an error about a huge input stays one
    readable line."""
    show = repr if quote else str
    if len(text) <= limit:
        return show(text)
    start = 0 if around is None else max(0, min(around - limit // 2, len(text) - limit))
    head = "..." if start else ""
    tail = "..." if start + limit < len(text) else ""
    return f"{head}{show(text[start:start + limit])}{tail} ({len(text)} characters)"


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
    if p.is_dir():
        raise PipelineError(f"pipeline file {clip(str(p))} is a directory; give a .yaml or .json file in it")
    if not p.is_file():
        raise PipelineError(f"pipeline file {clip(str(p))} does not exist; write `@path/to/pipeline.yaml`")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise PipelineError(f"pipeline file {clip(str(p))} must end in .yaml, .yml or .json")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PipelineError(f"pipeline file {clip(str(p))} is not UTF-8 text (a binary file?); write the "
                            "stages as YAML or JSON") from None
    except OSError as exc:
        raise PipelineError(f"cannot read pipeline file {clip(str(p))}: {exc.strerror or exc}") from None
    if not text.strip():
        raise PipelineError(f"pipeline file {clip(str(p))} is empty; write a list of stages such as "
                            "[{name: fastv, keep: 0.5}], or [] for the vanilla model")
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        if isinstance(exc, yaml.YAMLError):
            first = getattr(exc, "problem", None) or first
        kind = "JSON" if suffix == ".json" else "YAML"
        raise PipelineError(f"pipeline file {clip(str(p))} is not valid {kind}{where}: "
                            f"{clip(first, limit=120, quote=False)}") from None
    return pipeline_from_data(data, source=str(p))


def pipeline_from_data(data: Any, source: str = "pipeline data") -> PipelineSpec:
    """Build a spec from plain data: a list of stage mappings, a stage string, or ``{pipeline: ...}``."""
    if isinstance(data, dict) and set(data) <= {"pipeline", "stages"} and len(data) == 1:
        data = next(iter(data.values()))
    if data is None:
        return PipelineSpec()
    if isinstance(data, str):
        return _inline(data, source)
    if not isinstance(data, list):
        raise PipelineError(f"{source}: expected a list of stages like [{{name: fastv, keep: 0.5}}], got "
                            f"{type(data).__name__} {clip(repr(data), limit=80, quote=False)}")
    stages = []
    for i, item in enumerate(data, 1):
        if isinstance(item, str):
            stages.extend(_inline(item, source).stages)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise PipelineError(f"{source}: stage {i} must be a mapping with a `name` key naming a stage, "
                                f"got {clip(repr(item), limit=80, quote=False)}")
        params = {k: v for k, v in item.items() if k != "name"}
        for key, value in params.items():
            if not isinstance(key, str):
                raise PipelineError(f"{source}: stage {i} ({item['name']}): parameter name {key!r} is not a "
                                    "word; write `key: value` with a parameter's name")
            ok = isinstance(value, (int, float, bool, str)) or (
                isinstance(value, list) and all(isinstance(v, (int, float, bool, str)) for v in value)
            )
            if not ok:
                shown = clip(repr(value), limit=80, quote=False)
                raise PipelineError(f"{source}: stage {i} ({item['name']}): {key}={shown} is not a number, "
                                    "string, boolean or list of them")
        stages.append(StageSpec(item["name"], params))
    return PipelineSpec(tuple(stages))


def _inline(text: str, source: str) -> PipelineSpec:
    """A pipeline written as text inside a file or data (never another ``@file``)."""
    if text.strip().startswith("@"):
        raise PipelineError(f"{source}: {clip(text, limit=80)} names another pipeline file; a file holds the "
                            "stages themselves")
    return parse_pipeline(text)


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
