"""Evaluation product: results store, sweeps (kill and resume, failing rows), Pareto tables, CLI errors."""

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

from lmmsqueeze import ScoredPruner, register_reducer
from lmmsqueeze.cli import app
from lmmsqueeze.errors import LmmsqueezeError
from lmmsqueeze.evaluation.pareto import frontier, pareto_rows
from lmmsqueeze.evaluation.runner import loyalty
from lmmsqueeze.evaluation.store import Key, ResultStore
from lmmsqueeze.evaluation.sweep import expand_item, load_grid
from lmmsqueeze.reducers import unregister_reducer

runner = CliRunner()


def test_frontier_of_hand_made_points():
    # (cost, accuracy): A(1, .5) B(2, .7) C(3, .6) D(4, .9) E(2, .7 dup of B) F(5, .9)
    points = [(1, .5), (2, .7), (3, .6), (4, .9), (2, .7), (5, .9)]
    # C is dominated by B (cheaper, more accurate); F by D (cheaper, as accurate); B and E tie: both kept
    assert frontier(points) == [True, True, False, True, True, False]


def test_pareto_rows_sorted_with_relative_columns():
    rows = [
        {"pipeline": "none", "adapter": "", "accuracy": 0.8, "prefill_flops": 100, "latency_ms": 10,
         "saving": 0.0},
        {"pipeline": "b", "adapter": "", "accuracy": 0.7, "prefill_flops": 50, "latency_ms": 6,
         "saving": 0.5},
        {"pipeline": "c", "adapter": "", "accuracy": 0.6, "prefill_flops": 60, "latency_ms": 4,
         "saving": 0.4},
        {"pipeline": "d", "adapter": "", "accuracy": 0.9, "prefill_flops": 0, "latency_ms": 1, "saving": 1.0,
         "status": "failed"},
    ]
    out = pareto_rows(rows, "flops")
    assert [r["pipeline"] for r in out] == ["b", "c", "none"]
    assert [r["pareto"] for r in out] == [True, False, True]
    assert out[0]["accuracy_delta"] == pytest.approx(-0.1)
    by_latency = pareto_rows(rows, "latency")
    assert [r["pipeline"] for r in by_latency] == ["c", "b", "none"]
    assert [r["pareto"] for r in by_latency] == [True, True, True]
    assert by_latency[0]["saving"] == pytest.approx(0.6)


def test_a_task_trained_adapter_is_measured_against_its_trained_control(tmp_path):
    """A task-trained adapter whose control ran in the same group: its Δ acc is against the control row
    (vanilla-ft), which the tables name as such; a distilled adapter's Δ acc is against vanilla."""
    from lmmsqueeze.evaluation.pareto import delta_cell, label, to_markdown
    from lmmsqueeze.proxyv.attach import provenance

    for name, config in (("task", {"objective": "task", "control": "../control/adapter"}),
                         ("control/adapter", {}),
                         ("distilled", {"objective": "distill"})):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    task_ref, control_ref, distilled_ref = (
        str(tmp_path / n) for n in ("task", "control/adapter", "distilled"))
    rows = [
        {"pipeline": "none", "adapter": "", "accuracy": 0.80, "prefill_flops": 100, "saving": 0.0},
        {"pipeline": "proxyv(layer=1, variant=control)", "adapter": control_ref, "accuracy": 0.90,
         "prefill_flops": 105, "saving": -0.05, **provenance(control_ref)},
        {"pipeline": "proxyv(layer=1)", "adapter": task_ref, "accuracy": 0.93, "prefill_flops": 55,
         "saving": 0.45, **provenance(task_ref)},
        {"pipeline": "proxyv(layer=1)", "adapter": distilled_ref, "accuracy": 0.79, "prefill_flops": 55,
         "saving": 0.45, **provenance(distilled_ref)},
    ]
    out = {r["adapter"]: r for r in pareto_rows(rows)}
    assert out[task_ref]["accuracy_delta"] == pytest.approx(0.03)
    assert delta_cell(out[task_ref]) == "+3.0 vs ft"
    assert out[distilled_ref]["accuracy_delta"] == pytest.approx(-0.01)
    assert delta_cell(out[distilled_ref]) == "-1.0"
    assert label(out[control_ref]).startswith("vanilla-ft: ")
    assert out[control_ref]["accuracy_delta"] == pytest.approx(0.1)
    assert "vanilla-ft: proxyv(layer=1, variant=control)" in to_markdown(list(out.values()))
    alone = {r["adapter"]: r for r in pareto_rows(rows[:1] + rows[2:])}  # no control row: no Δ to show
    assert alone[task_ref]["accuracy_delta"] is None and alone[task_ref]["reference"] is None


def test_loyalty_counts_identical_answers():
    ref = [{"uid": str(i), "prediction": p} for i, p in enumerate("aabb")]
    ours = [{"uid": str(i), "prediction": p} for i, p in enumerate("abbb")]
    assert loyalty(ours, ref) == 0.75


def test_store_round_trip_and_replace(tmp_path):
    key = Key("m", "pool(size=2)", "", "bundled", 10, 0)
    answers = [{"uid": "u1", "qtype": "color", "prediction": "red", "answer": "red", "score": 1.0}]
    with ResultStore(tmp_path / "r.db") as store:
        assert not store.has(key)
        store.put(key, {"accuracy": 1.0}, answers)
        store.put(key, {"accuracy": 0.5}, answers)  # same identity: replaced, not duplicated
        assert store.has(key) and store.answers(key) == answers
        assert [r["accuracy"] for r in store.rows()] == [0.5]


def test_a_store_measured_with_earlier_method_behaviour_is_refused(tmp_path):
    """A results file written before the methods followed their released code (no semantics mark) holds
    rows whose pipeline strings now name other computations: refused with the fix, not reused."""
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, model TEXT NOT NULL, pipeline TEXT NOT NULL, "
               "adapter TEXT NOT NULL DEFAULT '', task TEXT NOT NULL, limit_n INTEGER NOT NULL, "
               "seed INTEGER NOT NULL, status TEXT NOT NULL, error TEXT, accuracy REAL, "
               "metrics TEXT NOT NULL, created REAL NOT NULL)")
    db.execute("INSERT INTO runs (model, pipeline, task, limit_n, seed, status, metrics, created) "
               "VALUES ('bundled', 'pdrop(keep=0.5, layer=8, stages=3, step=8)', 'bundled', 10, 0, 'ok', "
               "'{}', 0)")
    db.commit()
    db.close()
    with pytest.raises(LmmsqueezeError, match="earlier lmmsqueeze whose methods compute differently"):
        ResultStore(path)
    result = CliRunner().invoke(app, ["pareto", "--results", str(path)])
    assert result.exit_code == 2 and "give a new --results file" in result.stderr
    with ResultStore(tmp_path / "new.db") as store:  # a new store is marked and opens again
        store.put(Key("m", "none", "", "t", 1, 0), {"accuracy": 1.0})
    ResultStore(tmp_path / "new.db").close()


def test_default_grid_offers_the_shipped_adapters_on_the_bundled_model_only():
    from lmmsqueeze.evaluation.sweep import default_items

    bundled = [item.pipeline for item in default_items("bundled")]
    other = [item.pipeline for item in default_items("/models/qwen2-vl")]
    assert any(p.startswith("proxyv(") for p in bundled) and not any("proxyv" in p for p in other)
    assert "visionzip(dominant=27, contextual=5)" in bundled
    assert "visionzip(dominant=0.1875, contextual=0.035)" in other  # 27 and 5 of 144 as fractions


def test_grid_lists_expand_and_bad_grids_are_refused(tmp_path):
    expanded = [i.pipeline for i in expand_item("fastv(keep=[0.25, 0.5])")]
    assert expanded == ["fastv(keep=0.25)", "fastv(keep=0.5)"]
    good = tmp_path / "g.yaml"
    good.write_text("model: m\ntasks: bundled\nlimit: 5\npipelines:\n  - pool\n  - fastv(keep=[0.25, 0.5])\n")
    grid = load_grid(good)
    assert grid.model == "m" and grid.limit == 5 and len(grid.items) == 3
    for text, message in [("pipelines: pool\n", "needs a `pipelines:` list"),
                          ("pipelines: [pool]\nmodels: x\n", "unknown keys ['models']"),
                          ("pipelines: ['fastv(']\n", "cannot parse pipeline"),
                          ("pipelines: [3]\n", "must be a pipeline string")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        result = runner.invoke(app, ["sweep", "--grid", str(bad), "--results", str(tmp_path / "x.db")])
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["pareto", "--results", "{tmp}/missing.db"], "does not exist"),
    (["pareto", "--results", "{tmp}/empty.db"], "no results in"),
    (["pareto", "--results", "{tmp}/empty.db", "--format", "xml"], "--format 'xml' must be one of"),
    (["sweep", "--task", "vqa9000", "-p", "pool", "--results", "{tmp}/s.db"], "unknown task 'vqa9000'"),
    (["eval", "--task", "vqa9000"], "unknown task 'vqa9000'"),
    (["sweep", "--grid", "{tmp}/nogrid.yaml"], "does not exist"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    ResultStore(tmp_path / "empty.db").close()
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_json_row(tiny_dir, tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--pipeline", "pool | fastv(keep=3)",
                                 "--limit", "6", "--results", str(tmp_path / "r.db"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    for key in ("accuracy", "prefill_flops", "saving", "latency_ms", "peak_memory_mb", "loyalty",
                "image_tokens_avg", "pipeline", "per_type", "n"):
        assert key in row
    assert row["pipeline"] == "pool(size=2) | fastv(keep=3, layer=2)" and row["n"] == 6
    assert row["image_tokens_per_layer"] == [9, 9, 3, 3] and row["image_tokens_avg"] == 6
    with ResultStore(tmp_path / "r.db") as store:  # vanilla was stored too, for loyalty
        assert sorted(r["pipeline"] for r in store.rows()) == ["none", row["pipeline"]]


@pytest.fixture
def failing_reducer():
    @register_reducer("test_explodes", family="pruning", placements=("projector",), keeps_grid=False,
                      cite="test")
    @dataclass(frozen=True)
    class Explodes(ScoredPruner):
        """Always fails."""

        def score(self, state, signals):
            raise RuntimeError("boom inside the plugin")

    yield "test_explodes"
    unregister_reducer("test_explodes")


def test_a_failing_pipeline_is_stored_and_the_sweep_goes_on(tiny_dir, tmp_path, failing_reducer):
    db = tmp_path / "r.db"
    result = runner.invoke(app, ["sweep", "-m", str(tiny_dir), "-p", "test_explodes", "-p", "pool",
                                 "--limit", "4", "--results", str(db)])
    assert result.exit_code == 0, result.output
    with ResultStore(db) as store:
        rows = {r["pipeline"]: r for r in store.rows()}
    assert rows["test_explodes(keep=0.5)"]["status"] == "failed"
    assert rows["test_explodes(keep=0.5)"]["error"] == "RuntimeError: boom inside the plugin"
    assert rows["pool(size=2)"]["status"] == "ok" and rows["none"]["status"] == "ok"


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_without_loss_or_duplicates(tiny_dir, tmp_path):
    db = tmp_path / "r.db"
    args = [sys.executable, "-m", "lmmsqueeze", "sweep", "-m", str(tiny_dir), "--limit", "30",
            "-p", "random(keep=[0.2, 0.4, 0.6, 0.8], seed=1)", "-p", "pool", "--results", str(db)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    stored = 0
    while time.time() < deadline and proc.poll() is None:  # kill once some, not all, rows are in
        time.sleep(0.2)
        if db.exists():
            with ResultStore(db) as store:
                stored = len(list(store.rows()))
            if stored >= 2:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= stored < 6
    with ResultStore(db) as store:
        before = {(r["pipeline"], r["accuracy"]) for r in store.rows()}
    finished = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    with ResultStore(db) as store:
        rows = list(store.rows())
        pipelines = [r["pipeline"] for r in rows]
        assert len(pipelines) == len(set(pipelines)) == 6
        assert before <= {(r["pipeline"], r["accuracy"]) for r in rows}  # nothing finished was lost or redone
        assert all(len(store.answers(Key(r["model"], r["pipeline"], "", "bundled", 30, 0))) == 30
                   for r in rows)


@pytest.mark.slow
def test_the_main_job_prints_the_pareto_table_and_writes_the_plot(tmp_path):
    """`lmmsqueeze sweep` with no arguments (here on 10 samples) on the bundled model and benchmark."""
    from lmmsqueeze.bundled import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        pytest.fail("the bundled model's weights are missing")
    proc = subprocess.run([sys.executable, "-m", "lmmsqueeze", "sweep", "--limit", "10"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pareto frontier" in proc.stdout and "visionzip" in proc.stdout and "fastv" in proc.stdout
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    with ResultStore(tmp_path / "lmmsqueeze-results.db") as store:
        rows = list(store.rows())
    assert len(rows) >= 8 and all(r["status"] == "ok" for r in rows)


def test_markdown_escapes_pipes_inside_cells():
    from lmmsqueeze.evaluation.pareto import to_markdown

    rows = pareto_rows([{"pipeline": "pool | fastv(layer=2)", "adapter": "", "accuracy": 0.5,
                         "prefill_flops": 10, "latency_ms": 1.0}], "flops")
    cells = to_markdown(rows).splitlines()[2].split(" | ")  # splitting on unescaped pipes only
    assert "`pool \\| fastv(layer=2)`" in cells


def test_eval_with_an_adapter_directory_path(tmp_path):
    """The progress label holds the adapter path in brackets ("[/tmp/...]"), which is not markup."""
    import shutil

    from lmmsqueeze.proxyv.attach import adapter_path

    adapter = tmp_path / "my-adapter"
    shutil.copytree(adapter_path("bundled:proxyv-spatial"), adapter)
    result = runner.invoke(app, ["eval", "--adapter", str(adapter), "--limit", "2",
                                 "--results", str(tmp_path / "r.db"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["status"] == "ok" and row["pipeline"].startswith("proxyv(")


def test_a_finished_sweep_skips_without_loading_the_model(tiny_dir, tmp_path, monkeypatch):
    from lmmsqueeze.evaluation.sweep import Grid, GridItem, run_sweep
    from lmmsqueeze.runtime import loading

    grid = Grid(model=str(tiny_dir), tasks=["bundled"], limit=2, seed=0, items=[GridItem("pool")])
    first = run_sweep(grid, tmp_path / "r.db")
    assert [r["key"].pipeline for r in first] == ["none", "pool(size=2)"]

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every row is stored")

    monkeypatch.setattr(loading, "load_model", refuse)
    events = []
    assert run_sweep(grid, tmp_path / "r.db", on_event=lambda kind, info: events.append(kind)) == []
    assert events == ["skip", "skip"]


def test_loglikelihood_scores_the_continuation_at_the_rows_that_predict_it():
    """Against a per-token reference: log-prob of each continuation token at the logits row of the
    column before it (rows are mapped back through output_positions after an llm reduction)."""
    import torch

    from lmmsqueeze.evaluation.lmms_bridge import _Engine
    from lmmsqueeze.runtime import apply
    from lmmsqueeze.runtime.loading import build_prompt
    from lmmsqueeze.testing import random_image

    engine = _Engine("bundled", "pool | fastv(layer=2, keep=0.5)", None, "cpu")
    image = random_image(0, 96)
    question, answer = "what is the colour of the cell at row 3 column c ?", "red , 3"
    total, greedy = engine.loglikelihood([image], question, answer)
    prompt = build_prompt(engine.processor, question)
    full = engine.processor(images=image, text=f"{prompt} {answer}", return_tensors="pt")
    start = engine.processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad(), apply(engine.model, engine.plan) as run:
        logits = engine.model(**full).logits[0].float().log_softmax(-1)
    rows, ids = run.output_positions[0].tolist(), full["input_ids"][0].tolist()
    assert len(ids) - start == 3
    expected = sum(float(logits[rows.index(col - 1), ids[col]]) for col in range(start, len(ids)))
    all_greedy = all(int(logits[rows.index(col - 1)].argmax()) == ids[col] for col in range(start, len(ids)))
    assert abs(total - expected) < 1e-5 and greedy == all_greedy
