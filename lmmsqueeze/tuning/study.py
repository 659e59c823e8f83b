"""`lmmsqueeze tune`: an Optuna study over a :class:`~lmmsqueeze.tuning.space.Space`, rung by rung.

Each trial draws a pipeline (define-by-run: a number of stages, each an option and its parameters,
then a ProxyV adapter or none), compiles it with the validator and prices it with the analytic cost
model before anything runs: a refused, over-budget or already-tried candidate is rejected unrun
(the trial is pruned with the reason in its ``rejected`` attribute). A candidate that fits runs rung
by rung (e.g. 50 -> 150 -> 450 samples -> the full split) through :func:`run_sweep`, so each rung is
a normal row of the results store, looked up before it is evaluated; after every rung Optuna's
successive-halving pruner keeps the best third. The study lives in an Optuna storage beside the
results store (``<results>.tune.db``; any RDB URL for several machines), named after what it
searches, so a rerun resumes it and ``workers`` processes share it.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..compose import compile_pipeline
from ..compose.geometry import ModelGeometry
from ..errors import LmmsqueezeError
from ..evaluation import sweep
from ..evaluation.store import Key, ResultStore
from ..evaluation.sweep import Grid, GridItem, check_limit
from ..evaluation.tasks import get_task
from ..models import geometry_from_path
from ..proxyv.attach import pipeline_for
from ..runtime import loading
from .space import Space, assemble
from .warm import warm_start

METRICS = ("flops", "latency")
DEFAULT_RUNGS = (50, 150, 450)
#: a study stops asking after this many candidates per trial asked for were rejected unrun
REJECT_FACTOR = 200


class TuneError(LmmsqueezeError, ValueError):
    """Bad arguments to `tune`."""


@dataclass
class TuneConfig:
    """What one tuning study searches and where it keeps its results (see :func:`tune`)."""

    space: Space
    model: str = "bundled"
    task: str = "bundled"
    budget: float = 0.3
    metric: str = "flops"
    trials: int = 40
    seed: int = 0
    results: Path = Path("lmmsqueeze-results.db")
    storage: str | None = None
    rungs: tuple[int, ...] = DEFAULT_RUNGS
    reduction: int = 3
    device: str | None = None
    workers: int = 1
    limit: int | None = None
    warm: bool = True
    full: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.results = Path(self.results)
        check_args(self.budget, self.metric, self.trials, self.workers, self.seed, self.rungs)
        size = get_task(self.task).size
        if self.limit is not None:
            check_limit(self.limit, "--limit")
        self.full = min(self.limit or size, size)
        self.rungs = tuple(sorted({min(r, self.full) for r in self.rungs} | {self.full}))

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        path = self.results.with_name(self.results.stem + ".tune.db")
        return f"sqlite:///{path.resolve()}"

    @property
    def study_name(self) -> str:
        rungs = ",".join(map(str, self.rungs))  # the last is the full split (or --limit)
        return (f"tune/{self.model}/{self.task}/{self.metric}<={self.budget:g}/space-{self.space.digest()}/"
                f"seed-{self.seed}/rungs-{rungs}/eta-{self.reduction}" + ("" if self.warm else "/cold"))


def check_args(budget: Any, metric: Any, trials: Any, workers: Any = 1, seed: Any = 0,
               rungs: Any = DEFAULT_RUNGS) -> None:
    """Refuse bad tune arguments in one line, before anything is loaded."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise TuneError(f"--budget {budget!r} must be a fraction of the vanilla model's cost in (0, 1], "
                        "e.g. --budget 0.3 for at most 30%")
    if metric not in METRICS:
        raise TuneError(f"--metric {metric!r} must be one of {', '.join(METRICS)}")
    for name, value, low in (("--trials", trials, 1), ("--workers", workers, 1), ("--seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TuneError(f"{name} {value!r} must be an integer >= {low}")
    if (not isinstance(rungs, (list, tuple)) or not rungs
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rungs)):
        raise TuneError(f"--rungs {rungs!r} must be sample counts >= 1, e.g. 50,150,450")


def open_study(config: TuneConfig) -> optuna.Study:
    """The study (created or resumed) in its storage, with a seeded TPE sampler and the pruner."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = config.storage_url
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=5,
                                                 grace_period=20)
            sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=10, multivariate=True,
                                                 group=True)
    except Exception as exc:  # a bad URL, an unreachable server, a file that is not a study storage
        raise TuneError(f"cannot open the study storage {url!r}: {' '.join(str(exc).split())[:200]}; give "
                        "--storage sqlite:///FILE.db or an RDB URL") from None
    return optuna.create_study(
        storage=storage, study_name=config.study_name, direction="maximize", load_if_exists=True,
        sampler=sampler,
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=config.reduction),
    )


def evaluated(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran at least one rung, finished (complete or stopped early)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if "rungs" in t.user_attrs]


def suggest(trial: optuna.Trial, space: Space) -> tuple[str, str | None]:
    """One candidate: the pipeline and its ProxyV adapter (None for none)."""
    count = trial.suggest_int("stages", 0, space.max_stages) if space.options else 0
    keys = [o.key for o in space.options]
    stages = []
    for i in range(count):
        option = space.option(trial.suggest_categorical(f"s{i}", keys))
        params: dict[str, Any] = {}
        for name, r in option.ranges.items():
            label = f"s{i}.{option.key}.{name}"
            if r.kind == "choice":
                params[name] = trial.suggest_categorical(label, list(r.choices))
            elif r.kind == "int":
                params[name] = trial.suggest_int(label, r.low, r.high)
            else:
                params[name] = trial.suggest_float(label, r.low, r.high, log=r.log)
        stages.append((option, params))
    adapter = trial.suggest_categorical("proxyv", ["none", *space.adapters]) if space.adapters else "none"
    adapter = None if adapter == "none" else adapter
    return assemble(stages, adapter), adapter


def effect(plan: Any, adapter: str | None) -> str:
    """What a candidate does, at token resolution: its stages, placements, layers and token counts, with
    every fraction as the token count it resolves to, so that ``keep=0.1204`` and ``keep=0.1208`` (both
    17 of 144 tokens) are one candidate, tried once."""
    parts = []
    for s in plan.stages:
        params = sorted((k, round(v * s.tokens_in) if isinstance(v, float) else v)
                        for k, v in s.spec.params.items())
        parts.append(f"{s.name}@{s.placement}:{s.layer}:{s.tokens_in}->{s.tokens_out}:{params}")
    return " | ".join(parts) + f" [{adapter or ''}]"


def text_tokens(geometry: ModelGeometry, vanilla_flops: float) -> int:
    """The prompt length (text tokens) at which the analytic model gives the vanilla row's FLOPs: the
    mean the runner priced the task at, so candidates are priced as their rows will be."""
    plan = compile_pipeline("none", geometry)
    lo, hi = 0, 1 << 16
    while lo < hi:
        mid = (lo + hi) // 2
        if plan.cost(mid).vanilla_prefill_flops < vanilla_flops:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Objective:
    """One worker's objective: reject unrun, else evaluate rung by rung into the results store."""

    def __init__(self, config: TuneConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.config = config
        self.geometry = geometry_from_path(loading.model_dir(config.model))
        self.loaded: list[Any] = []
        self.on_event = on_event
        self.text: int | None = None

    def row(self, pipeline: str, adapter: str | None, limit: int) -> dict[str, Any]:
        """The stored row of a candidate at ``limit`` samples, evaluated first when not stored."""
        c = self.config
        grid = Grid(model=c.model, tasks=[c.task], limit=limit, seed=c.seed,
                    items=[GridItem(pipeline, adapter)] if pipeline != "none" else [])
        sweep.run_sweep(grid, c.results, device=c.device, on_event=self.on_event, loaded=self.loaded)
        with ResultStore(c.results, readonly=True) as store:
            found = store.row(Key(c.model, pipeline, adapter or "", c.task, limit, c.seed))
        if found is None:
            raise LmmsqueezeError(f"no row was stored for {pipeline!r} at {limit} samples")
        return found

    def price(self, pipeline: str, adapter: str | None) -> tuple[str, float, str]:
        """The canonical pipeline, its analytic cost relative to vanilla and its :func:`effect`, or a
        rejection."""
        try:
            pipeline_for(pipeline, adapter)
            plan = compile_pipeline(pipeline, self.geometry)
        except LmmsqueezeError as exc:
            raise Rejected("refused", str(exc)) from None
        if self.text is None:
            vanilla = self.row("none", None, self.config.rungs[0])
            self.text = text_tokens(self.geometry, vanilla["vanilla_prefill_flops"])
        return plan.canonical, 1.0 - plan.cost(self.text).saving, effect(plan, adapter)

    def __call__(self, trial: optuna.Trial) -> float:
        c = self.config
        pipeline, adapter = suggest(trial, c.space)
        trial.set_user_attr("pipeline", pipeline)
        trial.set_user_attr("adapter", adapter or "")
        try:
            canonical, cost, same = self.price(pipeline, adapter)
            trial.set_user_attr("pipeline", canonical)
            trial.set_user_attr("effect", same)
            trial.set_user_attr("flops_cost", cost)
            if c.metric == "flops" and cost > c.budget:
                raise Rejected("over budget", f"{100 * cost:.1f}% of the vanilla FLOPs > {100 * c.budget:g}%")
            if canonical == "none" and c.budget < 1:
                raise Rejected("over budget", "the vanilla model costs 100%")
            for other in [] if trial.user_attrs.get("finish") else evaluated(trial.study):
                if other.user_attrs.get("effect") == same:
                    raise Rejected("duplicate", f"trial {other.number} ran the same tokens "
                                   f"({other.user_attrs['pipeline']})")
        except Rejected as why:
            trial.set_user_attr("rejected", why.kind)
            trial.set_user_attr("reason", why.reason)
            raise optuna.TrialPruned(why.reason) from None
        done: list[list[float]] = []
        for i, limit in enumerate(c.rungs):
            row = self.row(canonical, adapter, limit)
            if row["status"] != "ok":
                trial.set_user_attr("rungs", done)
                trial.set_user_attr("failed", row["error"])
                raise optuna.TrialPruned(f"failed: {row['error']}")
            done.append([limit, row["accuracy"]])
            trial.set_user_attr("rungs", done)
            if c.metric == "flops" and 1.0 - row["saving"] > c.budget:  # an adaptive stage kept more
                trial.set_user_attr("rejected", "over budget")
                measured = 100 * (1 - row["saving"])
                trial.set_user_attr("reason", f"measured {measured:.1f}% of the vanilla FLOPs")
                raise optuna.TrialPruned("over the budget as measured")
            if c.metric == "latency" and i == 0:
                vanilla = self.row("none", None, limit)
                ratio = row["latency_ms"] / vanilla["latency_ms"]
                trial.set_user_attr("latency_cost", ratio)
                if ratio > c.budget:
                    trial.set_user_attr("rejected", "over budget")
                    trial.set_user_attr("reason", f"measured latency {100 * ratio:.1f}% of vanilla's")
                    raise optuna.TrialPruned("over the latency budget")
            if i + 1 < len(c.rungs) and not trial.user_attrs.get("finish"):
                trial.report(row["accuracy"], c.reduction ** i)
                if trial.should_prune():
                    trial.set_user_attr("stopped_at", limit)
                    raise optuna.TrialPruned(f"stopped after {limit} samples")
        trial.set_user_attr("saving", row["saving"])
        return float(row["accuracy"])


class Rejected(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def requeue(study: optuna.Study) -> None:
    """Ask again, once, for the candidates of trials that died mid-way (a killed worker's, failed when its
    heartbeat went stale): their stored rungs are reused, so they go on where they stopped."""
    done = set(study.user_attrs.get("requeued", []))
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if "rungs" in t.user_attrs and t.number not in done]
    for t in dead:
        study.enqueue_trial(t.params, user_attrs={"resumes": t.number})
    if dead:
        study.set_user_attr("requeued", sorted(done | {t.number for t in dead}))


def finish(study: optuna.Study, config: TuneConfig,
           on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """When no candidate within the budget reached the last rung (the pruner stopped every one, or the
    leader's worker was killed), run the furthest-reaching, most accurate one to the end."""
    ran = evaluated(study)
    if not ran or any(t.state == TrialState.COMPLETE for t in ran):
        return
    fits = [t for t in ran if "rejected" not in t.user_attrs and "failed" not in t.user_attrs]
    if not fits:
        return
    best = max(fits, key=lambda t: (len(t.user_attrs["rungs"]), t.user_attrs["rungs"][-1][1]))
    study.enqueue_trial(best.params, user_attrs={"finish": True, "resumes": best.number})
    study.optimize(Objective(config, on_event), n_trials=1, catch=(), gc_after_trial=False)


def _stopper(trials: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        requeue(study)
        done = len(evaluated(study))
        if done >= trials or len(study.get_trials(deepcopy=False)) >= trials * REJECT_FACTOR:
            study.stop()
    return stop


def work(config: TuneConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """One worker: run trials on the shared study until it holds ``config.trials`` evaluated ones."""
    study = open_study(config)
    if len(evaluated(study)) >= config.trials:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a killed worker (no heartbeat for 20 s)
    requeue(study)
    study.optimize(Objective(config, on_event), callbacks=[_stopper(config.trials)], catch=(),
                   gc_after_trial=False)


def _spawned(config: TuneConfig) -> None:
    work(config)


def run_workers(config: TuneConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """``config.workers`` processes on one study: this one and ``workers - 1`` spawned ones."""
    study = open_study(config)  # create it once, before several processes race to
    if config.warm:
        warm_start(study, config.model, config.space, geometry_from_path(loading.model_dir(config.model)))
    context = multiprocessing.get_context("spawn")
    others = [context.Process(target=_spawned, args=(config,), daemon=True)
              for _ in range(config.workers - 1)]
    for p in others:
        p.start()
    try:
        work(config, on_event)
    finally:
        for p in others:
            p.join()
    finish(open_study(config), config, on_event)
    failed = [p.exitcode for p in others if p.exitcode]
    if failed:
        raise LmmsqueezeError(f"{len(failed)} of {config.workers} tune workers failed (exit codes {failed}); "
                              "the study is kept: run the same command again to resume it")


__all__ = ["DEFAULT_RUNGS", "METRICS", "Objective", "TuneConfig", "TuneError", "check_args", "evaluated",
           "open_study", "run_workers", "suggest", "text_tokens", "work"]
