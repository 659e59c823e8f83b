"""Many machines: `sweep --shard I/N` runs a deterministic share of the grid's rows, and `results merge`
joins the shards' stores into the store of the whole grid run at once; merging again changes nothing,
an ok row beats a failed one, and a conflicting duplicate is reported and never overwrites."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmmsqueeze.cli import app
from lmmsqueeze.evaluation.shards import MEASURED, merge_stores, parse_shard, shard_grids
from lmmsqueeze.evaluation.store import Key, ResultStore
from lmmsqueeze.evaluation.sweep import Grid, GridItem, expand_item

runner = CliRunner()
SWEEP = ["sweep", "-p", "pool", "-p", "fastv(keep=[0.25, 0.5])", "--task", "bundled", "--limit", "3",
         "--device", "cpu"]


def stored(path: Path) -> dict:
    """Every row of a store by key: status, error, metrics minus what measures the machine, answers."""
    with ResultStore(path, readonly=True) as store:
        return {key: (status, error, {k: v for k, v in metrics.items() if k not in MEASURED}, answers)
                for key, status, error, metrics, answers in store.records()}


def raw(path: Path) -> list[tuple]:
    """Every byte of meaning in a store: its rows (with ids and creation times) and answers."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT * FROM runs ORDER BY id").fetchall() + db.execute(
            "SELECT * FROM answers ORDER BY run_id, idx").fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The whole grid in one store, and its two shards in two others."""
    tmp = tmp_path_factory.mktemp("shards")
    for name, extra in (("all.db", []), ("s1.db", ["--shard", "1/2"]), ("s2.db", ["--shard", "2/2"])):
        result = runner.invoke(app, [*SWEEP, "--results", str(tmp / name), *extra])
        assert result.exit_code == 0, result.output
    return tmp


def test_two_shards_merged_equal_the_whole_grid_and_merging_again_changes_nothing(sweeps, tmp_path):
    whole, one, two = (stored(sweeps / n) for n in ("all.db", "s1.db", "s2.db"))
    pipelines = lambda rows: {k.pipeline for k in rows} - {"none"}  # noqa: E731
    assert pipelines(one) and pipelines(two) and not pipelines(one) & pipelines(two)  # disjoint shards
    assert pipelines(one) | pipelines(two) == pipelines(whole) and len(whole) == 4
    merged = tmp_path / "merged.db"
    result = runner.invoke(app, ["results", "merge", str(sweeps / "s1.db"), str(sweeps / "s2.db"),
                                 "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert "4 added" in result.output and "1 already there" in result.output
    assert "0 conflicts" in result.output
    assert stored(merged) == whole  # the vanilla row both shards ran is kept once
    before = raw(merged)
    again = runner.invoke(app, ["results", "merge", str(sweeps / "s1.db"), str(sweeps / "s2.db"),
                                "-o", str(merged)])
    assert again.exit_code == 0 and "0 added" in again.output and "5 already there" in again.output
    assert raw(merged) == before  # not one row rewritten


def test_a_conflicting_duplicate_is_reported_and_the_kept_row_is_not_overwritten(sweeps, tmp_path):
    changed = tmp_path / "changed.db"
    changed.write_bytes((sweeps / "s1.db").read_bytes())
    with ResultStore(changed) as store:
        key = next(k for k, *_ in store.records() if k.pipeline != "none")
        _, _, metrics, answers = store.record(key)
        answers[0]["prediction"] = "something else"
        store.put(key, metrics, answers)
    merged = tmp_path / "merged.db"
    merged.write_bytes((sweeps / "s1.db").read_bytes())
    before = raw(merged)
    result = runner.invoke(app, ["results", "merge", str(changed), "-o", str(merged)])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"conflict: {key.pipeline} (bundled, 3 samples, seed 0)")
    assert "differs in answers" in lines[0] and "kept" in lines[0]
    assert raw(merged) == before


def test_an_ok_row_beats_a_failed_one_whichever_comes_first(tmp_path):
    key = Key("bundled", "pool(size=2)", "", "bundled", 3, 0)
    good = {"accuracy": 0.5, "prefill_flops": 10.0}
    answers = [{"uid": "a", "qtype": "q", "prediction": "x", "answer": "x", "score": 1.0}]
    with ResultStore(tmp_path / "ok.db") as store:
        store.put(key, good, answers)
    with ResultStore(tmp_path / "failed.db") as store:
        store.put(key, {}, error="RuntimeError: out of memory")
    for order in (["failed.db", "ok.db"], ["ok.db", "failed.db"]):
        out = tmp_path / f"{order[0]}-first.db"
        report = merge_stores([tmp_path / n for n in order], out)
        assert not report.conflicts
        assert stored(out)[key][:2] == ("ok", None) and stored(out)[key][3] == answers


def test_shards_are_disjoint_cover_the_grid_and_do_not_depend_on_its_order():
    items = [i for p in ("pool", "fastv(keep=[0.25, 0.5, 0.75])", "random(keep=0.5)") for i in expand_item(p)]
    grid = Grid(model="bundled", tasks=["bundled"], limit=3, items=items)
    shards = [shard_grids(grid, i, 3) for i in (1, 2, 3)]
    rows = [{(g.tasks[0], item) for g in shard for item in g.items} for shard in shards]
    assert all(rows) and sum(len(r) for r in rows) == len(items) and set().union(*rows) == {
        ("bundled", i) for i in items}
    reordered = Grid(model="bundled", tasks=["bundled"], limit=3, items=items[::-1])
    assert [shard_grids(reordered, i, 3) for i in (1, 2, 3)] == shards
    assert shard_grids(grid, 1, 9)[0].items and shard_grids(Grid(items=[GridItem("pool")]), 2, 2) == []
    assert parse_shard(" 2 / 4 ") == (2, 4)


def test_a_shard_without_rows_runs_nothing_and_says_so(tmp_path):
    result = runner.invoke(app, ["sweep", "-p", "pool", "--limit", "2", "--shard", "2/2", "--results",
                                 str(tmp_path / "r.db")])
    assert result.exit_code == 0, result.output
    assert "shard 2/2 holds none of this grid's rows" in result.stderr and not (tmp_path / "r.db").exists()
