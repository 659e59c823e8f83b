"""Sweeps: a grid of pipelines (lists expand), evaluated into the results store, resumable."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

from .. import __version__
from ..compose import compile_pipeline
from ..compose.spec import expand_lists, parse_pipeline
from ..errors import LmmsqueezeError, PipelineError
from ..models import geometry_from_path
from ..proxyv.attach import adapter_path, adapter_pipeline, pipeline_for
from ..runtime import loading  # module access: tests replace loading.load_model
from .runner import evaluate, loyalty
from .store import Key, ResultStore
from .tasks import get_task

DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class GridItem:
    """One pipeline of a sweep, with the ProxyV adapter it runs with (if any)."""

    pipeline: str
    adapter: str | None = None

    @property
    def label(self) -> str:
        return f"{self.pipeline} [{self.adapter}]" if self.adapter else self.pipeline


@dataclass
class Grid:
    """What a sweep runs: pipelines x tasks on one model."""

    model: str = "bundled"
    tasks: list[str] = field(default_factory=lambda: ["bundled"])
    limit: int = DEFAULT_LIMIT
    seed: int = 0
    items: list[GridItem] = field(default_factory=list)


def expand_item(text: str, adapter: str | None = None) -> list[GridItem]:
    """A pipeline whose list values expand into one item per combination (`keep=[0.25, 0.5]`)."""
    return [GridItem(spec.format(), adapter) for spec in expand_lists(parse_pipeline(text))]


def parse_items(entries: list[Any], source: str) -> list[GridItem]:
    """Grid entries: pipeline strings, or mappings ``{pipeline: ..., adapter: ...}`` (an adapter without
    a pipeline runs the pipeline it was trained for)."""
    items: list[GridItem] = []
    for i, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            items += expand_item(entry)
        elif isinstance(entry, dict) and set(entry) <= {"pipeline", "adapter"} and entry:
            adapter = entry.get("adapter")
            text = pipeline_for(str(entry.get("pipeline") or ""), adapter)
            items += expand_item(str(text), str(adapter) if adapter else None)
        else:
            raise LmmsqueezeError(
                f"{source}: entry {i} ({entry!r}) must be a pipeline string or a mapping with `pipeline` "
                "and/or `adapter`"
            )
    return items


def load_grid(path: str | Path) -> Grid:
    """Read a grid file (YAML or JSON) with `pipelines` and optionally `model`, `tasks`, `limit`, `seed`."""
    p = Path(path)
    if not p.is_file():
        raise LmmsqueezeError(f"grid file {str(p)!r} does not exist")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text())
        else:
            data = yaml.safe_load(p.read_text())
    except ValueError as exc:
        raise LmmsqueezeError(f"cannot read grid file {str(p)!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("pipelines"), list):
        raise LmmsqueezeError(f"grid file {str(p)!r} needs a `pipelines:` list (and optionally model, tasks, "
                              "limit, seed)")
    unknown = set(data) - {"pipelines", "model", "tasks", "task", "limit", "seed"}
    if unknown:
        raise LmmsqueezeError(f"grid file {str(p)!r}: unknown keys {sorted(unknown)}; valid: pipelines, "
                              "model, tasks, limit, seed")
    tasks = data.get("tasks", data.get("task", ["bundled"]))
    grid = Grid(
        model=str(data.get("model", "bundled")),
        tasks=[tasks] if isinstance(tasks, str) else [str(t) for t in tasks],
        limit=int(data.get("limit", DEFAULT_LIMIT)),
        seed=int(data.get("seed", 0)),
    )
    try:
        grid.items = parse_items(data["pipelines"], str(p))
    except PipelineError as exc:
        raise LmmsqueezeError(f"grid file {str(p)!r}: {exc}") from None
    return grid


def default_items(model: str = "bundled") -> list[GridItem]:
    """The default grid: budgets of the classic reducers, and on the bundled model its shipped ProxyV
    adapters (trained for it alone). VisionZip keeps 16/32/48 of the bundled model's 144 image
    tokens (about 5 dominant to 1 contextual), and the same fractions of any other model's."""
    zips = ["dominant=14, contextual=2", "dominant=27, contextual=5", "dominant=41, contextual=7"]
    if str(model) != "bundled":
        zips = ["dominant=0.097, contextual=0.014", "dominant=0.1875, contextual=0.035",
                "dominant=0.285, contextual=0.049"]
    items = [
        *expand_item("pool"),
        *expand_item("fastv(keep=[0.25, 0.5, 0.75])"),
        *(item for z in zips for item in expand_item(f"visionzip({z})")),
    ]
    if str(model) != "bundled":
        return items
    for name in ("proxyv-spatial", "proxyv-nonspatial"):
        if (adapter_path(f"bundled:{name}") / "adapter_config.json").is_file():
            items.append(GridItem(adapter_pipeline(f"bundled:{name}"), f"bundled:{name}"))
    return items


def run_sweep(
    grid: Grid,
    store_path: str | Path,
    batch_size: int = 1,
    device: str | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    remeasure: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate every (item, task) of a grid that is not in the store yet; vanilla always included.

    A pipeline that raises is stored as failed with its one-line error and the sweep goes on.
    ``on_event(kind, info)`` reports progress: ``start``, ``progress``, ``done``, ``skip``, ``failed``.
    ``remeasure`` evaluates the grid's items again even when stored (vanilla is reused). The model
    is loaded only when something has to run (keys come from its config).
    """
    tasks = [get_task(t) for t in grid.tasks]  # refuse unknown tasks before loading anything
    emit = on_event or (lambda kind, info: None)
    geometry = geometry_from_path(loading.model_dir(grid.model))
    loaded: list[Any] = []  # (model, processor) once something runs
    items = [GridItem("none"), *[i for i in grid.items if not (i.pipeline == "none" and not i.adapter)]]
    canonical: dict[GridItem, tuple[str, str | None]] = {}
    for item in items:  # the key of every item, and the one-line refusal of a pipeline that does not compile
        try:
            canonical[item] = (compile_pipeline(item.pipeline, geometry).canonical, None)
        except LmmsqueezeError as exc:
            canonical[item] = (item.pipeline, str(exc))
    results = []
    with ResultStore(store_path) as store:
        for task in tasks:
            limit = min(grid.limit, task.size)
            vanilla_key = Key(grid.model, "none", "", task.name, limit, grid.seed)
            vanilla_answers: list[dict[str, Any]] | None = None
            for n, item in enumerate(items):
                info = {"index": n, "total": len(items), "item": item.label, "task": task.name}
                pipeline, error = canonical[item]
                key = Key(grid.model, pipeline, item.adapter or "", task.name, limit, grid.seed)
                if store.has(key) and not (remeasure and key != vanilla_key):
                    emit("skip", info)
                    continue
                if not loaded:
                    loaded.extend(loading.load_model(grid.model, device=device))
                model, processor = loaded
                emit("start", {**info, "samples": limit})
                metrics: dict[str, Any] = {}
                answers: list[dict[str, Any]] = []
                if error is None:
                    try:
                        result = evaluate(
                            model, processor, pipeline, task, limit=limit, seed=grid.seed,
                            adapter=item.adapter, batch_size=batch_size,
                            on_progress=lambda done, total, info=info: emit(
                                "progress", {**info, "done": done, "samples": total}),
                        )
                    except Exception as exc:  # one failing pipeline must not end the sweep
                        error = " ".join(f"{type(exc).__name__}: {exc}".split())
                    else:
                        answers = result.pop("answers")
                        if key == vanilla_key:
                            vanilla_answers = answers
                        elif vanilla_answers is None:
                            vanilla_answers = store.answers(vanilla_key)
                        metrics = {**result, "loyalty": loyalty(answers, vanilla_answers), **versions()}
                store.put(key, metrics, answers, error=error)
                emit("failed" if error else "done", {**info, "error": error, **metrics})
                results.append({"key": key, "error": error, **metrics})
    return results


def versions() -> dict[str, Any]:
    return {"versions": {"lmmsqueeze": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}
