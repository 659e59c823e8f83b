"""What a tuning study found: the best pipeline, the Pareto front, and what it spent against a grid.

The grid it is compared with is the discretised grid of the same space: every numeric range at
:data:`~lmmsqueeze.reducers.search.GRID_LEVELS` levels (integers: all of them when there are no more;
log ranges geometrically), every choice, every chain of 0 to ``max_stages`` stages, each ProxyV choice.
A grid sweep would run each candidate the validator accepts within the budget on the full split
(plus vanilla); that count is estimated from a seeded uniform sample of the grid priced like the
tuner's candidates. ``sample_evaluations`` counts every (candidate, rung) row the study used, once,
plus vanilla at each rung: what a fresh results store would need, whoever ran it.
"""

from __future__ import annotations

import random
from typing import Any

from ..compose import compile_pipeline
from ..errors import LmmsqueezeError
from ..evaluation.pareto import pareto_rows
from ..evaluation.store import Key, ResultStore
from ..proxyv.attach import pipeline_for
from .space import Space, assemble
from .study import TuneConfig, evaluated, open_study, text_tokens

GRID_SAMPLES = 1000


def grid_draw(space: Space, rng: random.Random) -> tuple[str, str | None]:
    """One candidate drawn uniformly from the discretised grid."""
    per_stage = [o.grid_size() for o in space.options]
    total = sum(per_stage)
    weights = [total ** k for k in range(space.max_stages + 1)]
    count = rng.choices(range(space.max_stages + 1), weights=weights)[0] if total else 0
    stages = []
    for _ in range(count):
        option = rng.choices(space.options, weights=per_stage)[0]
        stages.append((option, {k: rng.choice(r.levels()) for k, r in option.ranges.items()}))
    adapter = rng.choice([None, *space.adapters])
    return assemble(stages, adapter), adapter


def grid_estimate(config: TuneConfig, geometry: Any, text: int | None, samples: int = GRID_SAMPLES
                  ) -> dict[str, Any]:
    """The grid's size and an estimate of how many of its candidates a sweep would run."""
    rng = random.Random(config.seed)
    ok = 0
    for _ in range(samples):
        pipeline, adapter = grid_draw(config.space, rng)
        try:
            pipeline_for(pipeline, adapter)
            plan = compile_pipeline(pipeline, geometry)
        except LmmsqueezeError:
            continue
        if config.metric == "flops" and text is not None and 1.0 - plan.cost(text).saving > config.budget:
            continue
        ok += 1
    size = config.space.grid_size()
    feasible = round(size * ok / samples)
    return {"grid_candidates": size, "grid_feasible": feasible, "grid_feasible_share": ok / samples,
            "grid_sample_evaluations": (feasible + 1) * config.full}


def _grid(study: Any, config: TuneConfig, geometry: Any, text: int | None, samples: int) -> dict[str, Any]:
    """The grid estimate, computed once per study and sample count (kept in the study)."""
    name = f"grid-{samples}"
    if name not in study.user_attrs:
        study.set_user_attr(name, grid_estimate(config, geometry, text, samples))
    return {**study.user_attrs[name], "grid_samples": samples}


def summarize(config: TuneConfig, geometry: Any, grid_samples: int = GRID_SAMPLES) -> dict[str, Any]:
    """The study's result as one plain dict (what `lmmsqueeze tune --json` prints)."""
    study = open_study(config)
    trials = study.get_trials(deepcopy=False)
    ran = evaluated(study)
    rejected: dict[str, int] = {}
    for t in trials:
        if "rejected" in t.user_attrs and "rungs" not in t.user_attrs:
            rejected[t.user_attrs["rejected"]] = rejected.get(t.user_attrs["rejected"], 0) + 1
    used: set[tuple[str, str, int]] = set()
    limits: set[int] = set()
    for t in ran:
        for limit, _ in t.user_attrs["rungs"]:
            used.add((t.user_attrs["pipeline"], t.user_attrs["adapter"], int(limit)))
            limits.add(int(limit))
    sample_evaluations = sum(limit for *_, limit in used) + sum(limits)
    c = config
    with ResultStore(c.results, readonly=True) as store:
        def full(pipeline: str, adapter: str) -> dict[str, Any] | None:
            row = store.row(Key(c.model, pipeline, adapter, c.task, c.full, c.seed))
            return row if row is not None and row["status"] == "ok" else None

        vanilla = full("none", "")
        first = store.row(Key(c.model, "none", "", c.task, c.rungs[0], c.seed))
        rows = [r for t in ran if t.state.name == "COMPLETE"
                and (r := full(t.user_attrs["pipeline"], t.user_attrs["adapter"])) is not None]
    unique = list({(r["pipeline"], r["adapter"]): r for r in rows}.values())

    def cost(r: dict[str, Any]) -> float:
        if c.metric == "latency" and vanilla and vanilla.get("latency_ms"):
            return r["latency_ms"] / vanilla["latency_ms"]
        return 1.0 - r["saving"]

    within = [r for r in unique if cost(r) <= c.budget + 1e-12]
    best = max(within, key=lambda r: (r["accuracy"], -cost(r)), default=None)
    ok = first is not None and first["status"] == "ok"
    text = text_tokens(geometry, first["vanilla_prefill_flops"]) if ok else None
    out: dict[str, Any] = {
        "best_pipeline": best["pipeline"] if best else None,
        "adapter": (best["adapter"] or None) if best else None,
        "accuracy": best["accuracy"] if best else None,
        "saving": best["saving"] if best else None,
        "cost": cost(best) if best else None,
        "vanilla_accuracy": vanilla["accuracy"] if vanilla else None,
        "sample_evaluations": sample_evaluations,
        **_grid(study, c, geometry, text, grid_samples),
        "trials": len(ran),
        "completed": sum(t.state.name == "COMPLETE" for t in ran),
        "stopped_early": sum("stopped_at" in t.user_attrs for t in ran),
        "rejected": sum(rejected.values()),
        "rejected_why": rejected,
        "asked": len(trials),
        "rungs": list(c.rungs),
        "model": c.model, "task": c.task, "budget": c.budget, "metric": c.metric, "seed": c.seed,
        "study": c.study_name, "storage": c.storage_url, "results": str(c.results),
        "pareto": pareto_rows([*([vanilla] if vanilla else []), *unique], "latency" if c.metric == "latency"
                              else "flops"),
    }
    return out


__all__ = ["GRID_SAMPLES", "grid_draw", "grid_estimate", "summarize"]
