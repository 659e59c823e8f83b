"""`lmmsqueeze tune`: declared ranges respect each reducer's bounds, a plugin's ranges are searched,
candidates refused or over budget never reach the model, every rung is a normal row of the store,
and a study killed with SIGKILL resumes without evaluating a stored rung again. On the bundled
model with tiny rungs (4 and 8 samples, last rung 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from lmmsqueeze import LAST_LAYER, ScoredPruner, register_reducer, searchable
from lmmsqueeze.cli import app
from lmmsqueeze.compose import compile_pipeline
from lmmsqueeze.evaluation import sweep
from lmmsqueeze.evaluation.store import ResultStore
from lmmsqueeze.models import geometry_from_path
from lmmsqueeze.reducers import get_reducer, list_reducers, search_ranges, unregister_reducer
from lmmsqueeze.reducers.registry import build_reducer
from lmmsqueeze.runtime.loading import model_dir
from lmmsqueeze.tuning import make_config, open_study, tune
from lmmsqueeze.tuning.study import evaluated

runner = CliRunner()
GEOMETRY = geometry_from_path(model_dir("bundled"))
SMALL = ["--rungs", "4,8", "--limit", "16", "--grid-samples", "40"]


class Counting:
    """Wraps the real runner: records (pipeline, adapter, samples) of every evaluation."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, model, processor, pipeline, task, limit=None, **kwargs):
        self.calls.append((pipeline, kwargs.get("adapter") or "", limit))
        return self.real(model, processor, pipeline, task, limit=limit, **kwargs)


@pytest.fixture
def counting(monkeypatch):
    calls = Counting(sweep.evaluate)
    monkeypatch.setattr(sweep, "evaluate", calls)
    return calls


def stored_keys(db) -> set[tuple[str, str, int]]:
    with ResultStore(db, readonly=True) as store:
        return {(r["pipeline"], r["adapter"], r["limit"]) for r in store.rows()}


def test_every_declared_range_builds_valid_reducers_at_its_ends():
    """The ends (and grid levels) of every built-in range pass the reducer's own checks."""
    declared = 0
    for name in list_reducers():
        for param, r in search_ranges(get_reducer(name)).items():
            r = r.resolve(GEOMETRY.num_layers)
            for value in r.levels() + ([r.low, r.high] if r.kind != "choice" else []):
                build_reducer(name, {param: value})  # raises PipelineError when out of bounds
            declared += 1
    assert declared >= 25
    assert {"keep", "layer"} <= set(search_ranges(get_reducer("fastv")))


@pytest.fixture
def plugin():
    @register_reducer("tiny_tail", family="pruning", placements=("projector", "llm"), keeps_grid=False,
                      cite="test plugin")
    @dataclass(frozen=True)
    class TinyTail(ScoredPruner):
        """Keep the last ``keep`` tokens."""

        keep: int | float = searchable(0.3, low=0.1, high=0.35)
        layer: int | None = searchable(None, low=1, high=LAST_LAYER)

        def score(self, state, signals):
            return state.index.float()

    yield TinyTail
    unregister_reducer("tiny_tail")


def test_a_plugin_with_declared_ranges_is_searched(tmp_path, plugin):
    space = {"reducers": {"tiny_tail": {}}, "max_stages": 2, "adapters": []}
    config = make_config(budget=0.6, trials=4, space=space, results=tmp_path / "r.db", rungs=(4, 8), limit=16)
    assert [o.key for o in config.space.options] == ["tiny_tail@projector", "tiny_tail@llm"]
    out = tune(config, grid_samples=50)
    ran = evaluated(open_study(config))
    assert len(ran) == out["trials"] == 4
    for t in ran:
        stages = t.params["stages"]
        assert stages >= 1
        for i in range(stages):
            assert t.params[f"s{i}"].startswith("tiny_tail@")
            keep = next(v for k, v in t.params.items() if k.startswith(f"s{i}.") and k.endswith(".keep"))
            assert 0.1 <= keep <= 0.35
        plan = compile_pipeline(t.user_attrs["pipeline"], GEOMETRY)
        assert [s.name for s in plan.stages] and {s.name for s in plan.stages} == {"tiny_tail"}
        for s in plan.stages:
            assert 0.1 <= s.reducer.keep <= 0.35
            assert s.layer is None or 1 <= s.layer <= GEOMETRY.num_layers - 1
    assert out["best_pipeline"].startswith("tiny_tail(")


def test_rejected_candidates_never_reach_the_model_and_rungs_are_normal_rows(tmp_path, counting):
    db = tmp_path / "r.db"
    result = runner.invoke(app, ["tune", "--budget", "0.25", "--trials", "5", "--results", str(db), *SMALL,
                                 "--plot", str(tmp_path / "p.png"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for name in ("best_pipeline", "accuracy", "saving", "sample_evaluations", "grid_sample_evaluations",
                 "trials"):
        assert name in out
    assert out["trials"] == 5 and out["rejected"] > 0 and (tmp_path / "p.png").is_file()
    config = make_config(budget=0.25, trials=5, results=db, rungs=(4, 8), limit=16)
    study = open_study(config)
    rejected = {t.user_attrs["pipeline"] for t in study.trials if "rejected" in t.user_attrs
                and "rungs" not in t.user_attrs}
    ran = [(p, a) for p, a, _ in counting.calls if p != "none"]
    assert rejected and not rejected & {p for p, _ in ran}
    # every evaluated candidate runs within the budget, by the runner's own measurement; each (pipeline,
    # rung) ran once, and the sample count is what the study reports
    with ResultStore(db, readonly=True) as store:
        rows = {(r["pipeline"], r["adapter"], r["limit"]): r for r in store.rows()}
    assert len(counting.calls) == len(set(counting.calls)) == len(rows)
    assert out["sample_evaluations"] == out["evaluated_now"] == sum(n for *_, n in counting.calls)
    for p, a, n in counting.calls:
        assert rows[(p, a, n)]["status"] == "ok" and n in (4, 8, 16)
        if p != "none" and rows[(p, a, n)]["saving"] < 0.75:  # only an adaptive stage can surprise the
            assert n == 4 and any(s.adaptive for s in compile_pipeline(p, GEOMETRY).stages)  # pricing
    for t in evaluated(study):
        for limit, accuracy in t.user_attrs["rungs"]:
            assert rows[(t.user_attrs["pipeline"], t.user_attrs["adapter"], limit)]["accuracy"] == accuracy
    best = rows[(out["best_pipeline"], out["adapter"] or "", 16)]
    assert best["accuracy"] == out["accuracy"] and best["saving"] == out["saving"]
    # the rung rows are what `pareto` reads like any other
    table = runner.invoke(app, ["pareto", "--results", str(db), "--limit", "4", "--format", "json"])
    assert table.exit_code == 0 and len(json.loads(table.stdout)) >= 2
    # the best pipeline is ready for --pipeline; `eval` measures the same accuracy on the same samples
    check = runner.invoke(app, ["eval", "-p", out["best_pipeline"], *(["--adapter", out["adapter"]]
                                                                       if out["adapter"] else []),
                                "--limit", "16", "--results", str(tmp_path / "e.db"), "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["accuracy"] == out["accuracy"]
    # the same command again resumes the finished study: nothing is evaluated
    counting.calls.clear()
    again = runner.invoke(app, ["tune", "--budget", "0.25", "--trials", "5", "--results", str(db), *SMALL,
                                "--json"])
    assert again.exit_code == 0, again.output
    assert counting.calls == [] and json.loads(again.stdout)["evaluated_now"] == 0
    assert json.loads(again.stdout)["best_pipeline"] == out["best_pipeline"]


@pytest.mark.slow
def test_a_killed_study_resumes_without_evaluating_a_stored_rung(tmp_path, counting):
    db = tmp_path / "r.db"
    args = ["tune", "--budget", "0.3", "--trials", "8", "--results", str(db), "--rungs", "8,16",
            "--limit", "32", "--grid-samples", "40"]
    proc = subprocess.Popen([sys.executable, "-m", "lmmsqueeze", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if db.exists() and len([k for k in stored_keys(db) if k[0] != "none"]) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the tune process ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stored_keys(db)
    config = make_config(budget=0.3, trials=8, results=db, rungs=(8, 16), limit=32)
    done_before = len(evaluated(open_study(config)))
    assert done_before < 8
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert not {(p, a, n) for p, a, n in counting.calls} & before  # no stored rung evaluated again
    assert out["trials"] >= 8 and out["completed"] >= 1
    assert before <= stored_keys(db)
    assert out["evaluated_now"] == sum(n for *_, n in counting.calls)


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    db = tmp_path / "r.db"
    space = tmp_path / "space.yaml"
    space.write_text("max_stages: 1\nadapters: []\nreducers: {fastv: {layer: [1, 2]}, visionzip: {}}\n")
    result = runner.invoke(app, ["tune", "--budget", "0.5", "--trials", "6", "--workers", "2", "--space",
                                 str(space), "--results", str(db), *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    config = make_config(budget=0.5, trials=6, space=space, results=db, rungs=(4, 8), limit=16)
    ran = evaluated(open_study(config))
    assert 6 <= len(ran) <= 7  # the second worker may finish the trial it had started
    assert all(stored_keys(db) >= {(t.user_attrs["pipeline"], t.user_attrs["adapter"], n)
                                   for n, _ in t.user_attrs["rungs"]} for t in ran)


def test_a_space_file_narrows_the_search(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("max_stages: 2\nplacements: [vision, llm]\nadapters: []\n"
                     "reducers:\n  fastv: {keep: [0.05, 0.5], layer: [1, 2]}\n  tome: {metric: keys}\n")
    config = make_config(budget=0.5, trials=1, space=space, results=tmp_path / "r.db")
    keys = [o.key for o in config.space.options]
    assert keys == ["fastv@llm", "tome@vision", "tome@llm"]
    fastv = config.space.option("fastv@llm")
    assert (fastv.ranges["keep"].low, fastv.ranges["keep"].high) == (0.05, 0.5)
    assert (fastv.ranges["layer"].low, fastv.ranges["layer"].high) == (1, 2)
    assert config.space.option("tome@vision").fixed == {"metric": "keys"}
    assert "metric" not in config.space.option("tome@vision").ranges
    per_stage = 5 * 2 + 5 + 5 * 4  # fastv keep x layer; tome keep (vision); tome keep x layer 0..3 (llm)
    assert config.space.grid_size() == 1 + per_stage + per_stage ** 2


def test_warm_start_draws_the_default_grid_pipelines_token_for_token(tmp_path):
    """Every default grid pipeline is expressed as trial parameters that draw the same plan."""
    import optuna

    from lmmsqueeze.evaluation.sweep import default_items
    from lmmsqueeze.tuning.study import suggest
    from lmmsqueeze.tuning.warm import params_for

    config = make_config(budget=0.25, results=tmp_path / "r.db")
    study = optuna.create_study(direction="maximize")
    items = default_items("bundled")
    for item in items:
        params = params_for(item.pipeline, item.adapter, config.space, GEOMETRY)
        assert params is not None, item.label
        study.enqueue_trial(params)
        trial = study.ask()
        pipeline, adapter = suggest(trial, config.space)
        study.tell(trial, 0.0)
        assert adapter == item.adapter
        assert (compile_pipeline(pipeline, GEOMETRY).tokens_per_layer()
                == compile_pipeline(item.pipeline, GEOMETRY).tokens_per_layer()), item.label
    narrow = make_config(budget=0.25, results=tmp_path / "r.db",
                         space={"reducers": ["fastv"], "adapters": []})
    assert [i.pipeline for i in items if params_for(i.pipeline, i.adapter, narrow.space, GEOMETRY)] == [
        "fastv(keep=0.25)", "fastv(keep=0.5)", "fastv(keep=0.75)"]


def test_candidates_that_keep_the_same_tokens_are_one_candidate():
    from lmmsqueeze.tuning.study import effect

    def of(p, adapter=None):
        return effect(compile_pipeline(p, GEOMETRY), adapter)

    # 0.1204 x 144 = 17.3 and 0.1208 x 144 = 17.4: both keep 17 tokens, as keep=17 does
    assert of("fastv(keep=0.1204)") == of("fastv(keep=0.1208)") == of("fastv(keep=17)")
    assert of("fastv(keep=0.1204)") != of("fastv(keep=0.2)") != of("fastv(keep=0.2, layer=3)")
    assert of("visionzip(dominant=0.1875, contextual=0.0347)") == of("visionzip(dominant=27, contextual=5)")
    spatial = "proxyv(factor=3, layer=1)"
    assert of(spatial, "bundled:proxyv-spatial") != of(spatial, "elsewhere")
