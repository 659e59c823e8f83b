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


def _short(value: Any, limit: int = 60) -> str:
    """A user's value as an error message quotes it: repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_items(entries: list[Any], source: str) -> list[GridItem]:
    """Grid entries: pipeline strings, or mappings ``{pipeline: ..., adapter: ...}`` (an adapter without
    a pipeline runs the pipeline it was trained for)."""
    items: list[GridItem] = []
    for i, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            items += expand_item(entry)
        elif (isinstance(entry, dict) and entry and set(entry) <= {"pipeline", "adapter"}
              and all(v is None or isinstance(v, str) for v in entry.values())):
            adapter = entry.get("adapter")
            text = pipeline_for(entry.get("pipeline") or "", adapter)
            items += expand_item(str(text), adapter or None)
        else:
            raise LmmsqueezeError(
                f"{source}: entry {i} ({_short(entry)}) must be a pipeline string or a mapping with a string "
                "`pipeline` and/or `adapter`"
            )
    return items


def check_limit(limit: Any, where: str = "limit") -> int:
    """``limit`` (samples per run) as an integer >= 1, or a one-line refusal naming ``where`` it came from."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise LmmsqueezeError(f"{where} must be an integer >= 1 (samples per run), not {_short(limit)}; "
                              f"e.g. {where}: 100 or --limit 100")
    return limit


def check_grid(grid: Grid, source: str = "sweep") -> None:
    """Refuse a grid whose fields have the wrong type or range, before anything is loaded or run."""
    if not isinstance(grid.model, str) or not grid.model:
        raise LmmsqueezeError(f"{source}: `model` must be a model directory or `bundled`, not "
                              f"{_short(grid.model)}")
    if (not isinstance(grid.tasks, list) or not grid.tasks
            or not all(isinstance(t, str) and t for t in grid.tasks)):
        raise LmmsqueezeError(f"{source}: `tasks` must be a task name or a list of task names, not "
                              f"{_short(grid.tasks)}; e.g. tasks: [bundled]")
    check_limit(grid.limit, f"{source}: `limit`")
    if isinstance(grid.seed, bool) or not isinstance(grid.seed, int) or grid.seed < 0:
        raise LmmsqueezeError(f"{source}: `seed` must be an integer >= 0, not {_short(grid.seed)}")


def load_grid(path: str | Path) -> Grid:
    """Read a grid file (YAML or JSON) with `pipelines` and optionally `model`, `tasks`, `limit`, `seed`.

    Every problem (unreadable, binary or invalid YAML/JSON, unknown keys, fields of the wrong type or
    range, pipelines that do not parse) is one :class:`LmmsqueezeError` naming the file and the field.
    """
    p = Path(path)
    where = f"grid file {str(p)!r}"
    if not p.is_file():
        raise LmmsqueezeError(f"{where} does not exist" if not p.exists() else f"{where} is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise LmmsqueezeError(f"{where} is not a UTF-8 text file; write the grid as YAML or JSON") from None
    except (ValueError, yaml.YAMLError, OSError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise LmmsqueezeError(f"cannot read {where}: {first}") from None
    if not isinstance(data, dict) or not isinstance(data.get("pipelines"), list):
        raise LmmsqueezeError(f"{where} needs a `pipelines:` list (and optionally model, tasks, limit, seed)")
    unknown = set(data) - {"pipelines", "model", "tasks", "task", "limit", "seed"}
    if unknown:
        raise LmmsqueezeError(f"{where}: unknown keys {sorted(map(str, unknown))}; valid: pipelines, model, "
                              "tasks, limit, seed")
    if "task" in data and "tasks" in data:
        raise LmmsqueezeError(f"{where}: give `tasks` or `task`, not both")
    if not data["pipelines"]:
        raise LmmsqueezeError(f"{where}: `pipelines` is empty; list at least one pipeline (`none` is "
                              "the vanilla model)")
    tasks = data.get("tasks", data.get("task", ["bundled"]))
    grid = Grid(model=data.get("model", "bundled"), tasks=[tasks] if isinstance(tasks, str) else tasks,
                limit=data.get("limit", DEFAULT_LIMIT), seed=data.get("seed", 0))
    check_grid(grid, where)
    try:
        grid.items = parse_items(data["pipelines"], where)
    except PipelineError as exc:
        raise LmmsqueezeError(f"{where}: {exc}") from None
    return grid


def grid_groups(grid: Grid) -> list[tuple[str, str, int, int]]:
    """The (model, task, limit, seed) result groups a sweep of ``grid`` fills (what it then shows)."""
    return [(grid.model, task.name, min(grid.limit, task.size), grid.seed)
            for task in (get_task(t) for t in grid.tasks)]


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


def check_sweep(grid: Grid) -> dict[GridItem, str]:
    """Everything a sweep checks before it loads or runs anything: the grid's fields, its tasks, and
    every pipeline compiled against the model's geometry (read from its config). Returns the items
    (vanilla first) with their canonical pipelines; the first refusal is one :class:`PipelineError`."""
    check_grid(grid)
    for name in grid.tasks:
        get_task(name)
    geometry = geometry_from_path(loading.model_dir(grid.model))
    items = [GridItem("none"), *[i for i in grid.items if not (i.pipeline == "none" and not i.adapter)]]
    canonical: dict[GridItem, str] = {}
    refused: list[tuple[GridItem, LmmsqueezeError]] = []
    for item in items:
        try:
            canonical[item] = compile_pipeline(item.pipeline, geometry).canonical
        except LmmsqueezeError as exc:
            refused.append((item, exc))
    if refused:
        item, exc = refused[0]
        more = f" ({len(refused) - 1} more refused)" if len(refused) > 1 else ""
        raise PipelineError(f"{_short(item.label, 120)}: {exc}{more}; nothing was run")
    return canonical


def run_sweep(
    grid: Grid,
    store_path: str | Path,
    batch_size: int = 1,
    device: str | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    remeasure: bool = False,
    retry_failed: bool = False,
    loaded: list[Any] | None = None,
    evaluator: Callable[..., dict[str, Any]] | None = None,
    load: Callable[[], tuple[Any, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every (item, task) of a grid that is not in the store yet; vanilla always included.

    Before anything is loaded or run, :func:`check_sweep` checks the grid and compiles every pipeline
    against the model's geometry: a pipeline the compiler refuses refuses the whole sweep with its
    one-line error, and nothing is stored. A pipeline that raises while running
    is stored as failed with its one-line error and the sweep goes on; a failed run never replaces a
    successful row (the result then says ``kept: True``).

    Stored rows are skipped: successful ones always (unless ``remeasure``), failed ones unless
    ``retry_failed``. ``remeasure`` evaluates the grid's items again even when stored (vanilla is
    reused unless it failed and ``retry_failed``). ``on_event(kind, info)`` reports progress:
    ``start``, ``progress``, ``done``, ``skip`` (``info["status"]`` says what is stored), ``failed``.
    The model is loaded only when something has to run; ``loaded``, a list that holds (model, processor)
    once loaded, lets several calls share one load (`lmmsqueeze tune` evaluates rung after rung).
    ``evaluator`` replaces :func:`~lmmsqueeze.evaluation.runner.evaluate` (same signature; data-parallel
    ranks: :class:`lmmsqueeze.evaluation.distributed.Leader`), ``load()`` the model's loading.
    """
    canonical = check_sweep(grid)
    items = list(canonical)
    tasks = [get_task(t) for t in grid.tasks]
    emit = on_event or (lambda kind, info: None)
    loaded = [] if loaded is None else loaded  # (model, processor) once something runs
    results = []
    with ResultStore(store_path) as store:
        for task in tasks:
            limit = min(grid.limit, task.size)
            vanilla_key = Key(grid.model, "none", "", task.name, limit, grid.seed)
            vanilla_answers: list[dict[str, Any]] | None = None
            for n, item in enumerate(items):
                info = {"index": n, "total": len(items), "item": item.label, "task": task.name}
                pipeline = canonical[item]
                key = Key(grid.model, pipeline, item.adapter or "", task.name, limit, grid.seed)
                stored = store.status(key)
                again = remeasure and key != vanilla_key
                if stored == "ok" and not again or stored == "failed" and not (again or retry_failed):
                    emit("skip", {**info, "status": stored})
                    continue
                if not loaded:
                    loaded.extend(load() if load else loading.load_model(grid.model, device=device))
                model, processor = loaded
                emit("start", {**info, "samples": limit})
                metrics: dict[str, Any] = {}
                answers: list[dict[str, Any]] = []
                error = None
                try:
                    result = (evaluator or evaluate)(
                        model, processor, pipeline, task, limit=limit, seed=grid.seed,
                        adapter=item.adapter, batch_size=batch_size,
                        on_progress=lambda done, total, info=info: emit(
                            "progress", {**info, "done": done, "samples": total}),
                    )
                    if not result["answers"]:
                        raise LmmsqueezeError("no sample was evaluated")
                except Exception as exc:  # one failing pipeline must not end the sweep
                    error = " ".join(f"{type(exc).__name__}: {exc}".split())
                else:
                    answers = result.pop("answers")
                    if key == vanilla_key:
                        vanilla_answers = answers
                    elif vanilla_answers is None:
                        vanilla_answers = store.answers(vanilla_key)
                    metrics = {**result, "loyalty": loyalty(answers, vanilla_answers), **versions()}
                kept = not store.put(key, metrics, answers, error=error)  # a failure never replaces an ok row
                emit("failed" if error else "done", {**info, "error": error, "kept": kept, **metrics})
                results.append({"key": key, "error": error, "kept": kept, **metrics})
    return results


def versions() -> dict[str, Any]:
    return {"versions": {"lmmsqueeze": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}
