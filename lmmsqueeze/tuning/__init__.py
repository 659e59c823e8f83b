"""`lmmsqueeze tune`: search the composition space for the most accurate pipeline under a cost budget.

Needs the ``tune`` extra (Optuna). :func:`tune` is what the command runs::

    from lmmsqueeze.tuning import make_config, tune
    result = tune(make_config(model="bundled", budget=0.25, trials=40))
    result["best_pipeline"], result["accuracy"], result["saving"]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..evaluation.store import ResultStore
from ..evaluation.sweep import check_limit
from ..evaluation.tasks import get_task
from ..models import geometry_from_path
from ..runtime import loading
from .report import GRID_SAMPLES, grid_estimate, summarize
from .space import Option, Space, SpaceError, build_space, load_space
from .study import DEFAULT_RUNGS, METRICS, TuneConfig, TuneError, check_args, open_study, run_workers


def make_config(model: str = "bundled", task: str = "bundled", budget: float = 0.3, metric: str = "flops",
                trials: int = 40, space: str | Path | dict[str, Any] | Space | None = None, workers: int = 1,
                seed: int = 0, results: str | Path = "lmmsqueeze-results.db", storage: str | None = None,
                rungs: tuple[int, ...] | list[int] = DEFAULT_RUNGS, device: str | None = None,
                limit: int | None = None, warm: bool = True) -> TuneConfig:
    """A checked :class:`TuneConfig`: the arguments first, then the task, the model's geometry and the
    space (a space file, its data as a dict, a :class:`Space`, or None for the default space); every
    problem is one :class:`~lmmsqueeze.errors.LmmsqueezeError` before anything is loaded or run."""
    check_args(budget, metric, trials, workers, seed, list(rungs))
    if limit is not None:
        check_limit(limit, "--limit")
    get_task(task)
    geometry = geometry_from_path(loading.model_dir(model))
    if isinstance(space, (str, Path)):
        space = load_space(space, model, geometry)
    elif not isinstance(space, Space):
        space = build_space(space, model, geometry)
    return TuneConfig(space=space, model=model, task=task, budget=budget, metric=metric, trials=trials,
                      seed=seed, results=Path(results), storage=storage, rungs=tuple(rungs), device=device,
                      workers=workers, limit=limit, warm=warm)


def _stored(config: TuneConfig) -> set[tuple[str, str, int]]:
    with ResultStore(config.results, readonly=True) as store:
        rows = store.rows(task=config.task, model=config.model)
        return {(r["pipeline"], r["adapter"], r["limit"]) for r in rows if r["seed"] == config.seed}


def tune(config: TuneConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None,
         grid_samples: int = GRID_SAMPLES) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``config.trials`` evaluated trials, with
    ``config.workers`` processes, and return :func:`~lmmsqueeze.tuning.report.summarize`'s dict plus
    ``evaluated_now``: the samples this call evaluated (rows it added to the store)."""
    ResultStore(config.results).close()  # refuse an unusable results file before anything runs
    before = _stored(config)
    run_workers(config, on_event)
    geometry = geometry_from_path(loading.model_dir(config.model))
    out = summarize(config, geometry, grid_samples)
    out["evaluated_now"] = sum(limit for *_, limit in _stored(config) - before)
    return out


__all__ = ["DEFAULT_RUNGS", "GRID_SAMPLES", "METRICS", "Option", "Space", "SpaceError", "TuneConfig",
           "TuneError", "build_space", "grid_estimate", "load_space", "make_config", "open_study",
           "summarize", "tune"]
