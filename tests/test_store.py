"""The results store never loses a row; sweeps, evals and pareto refuse bad input in one line.

Most tests replace the runner's `evaluate` (and the model loader) with stand-ins: what is checked is
what reaches the store and the terminal, not a model's answers. One test runs the bundled model for
real (the issue's damaged-adapter re-run).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmmsqueeze.cli import app
from lmmsqueeze.errors import LmmsqueezeError
from lmmsqueeze.evaluation import pareto, sweep
from lmmsqueeze.evaluation.store import Key, ResultStore
from lmmsqueeze.runtime import loading

runner = CliRunner()
POOL = "pool(size=2)"  # the canonical form of `pool`


def key(pipeline: str = POOL, limit: int = 3, adapter: str = "") -> Key:
    return Key("bundled", pipeline, adapter, "bundled", limit, 0)


def answers(n: int, prediction: str = "red") -> list[dict]:
    return [{"uid": f"u{i}", "qtype": "color", "prediction": prediction, "answer": "red",
             "score": float(prediction == "red")} for i in range(n)]


class FakeRuns:
    """Stands in for the runner: every call answers ``n`` samples, or raises for pipelines in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = (), accuracy: float = 0.5):
        self.fail, self.accuracy, self.calls = fail, accuracy, []

    def __call__(self, model, processor, pipeline, task, limit=None, **kwargs):
        self.calls.append(pipeline)
        if pipeline in self.fail:
            raise RuntimeError(f"boom in {pipeline}")
        return {"pipeline": pipeline, "task": task.name, "n": limit, "accuracy": self.accuracy,
                "prefill_flops": 100.0 if pipeline == "none" else 50.0, "saving": 0.0, "latency_ms": 1.0,
                "answers": answers(limit)}


@pytest.fixture
def fake(monkeypatch):
    """Model loading that costs nothing and a runner that answers instantly (``fake.fail`` to fail)."""
    runs = FakeRuns()
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(sweep, "evaluate", runs)
    return runs


def seeded_store(path: Path) -> bytes:
    """A store holding one vanilla and one pool row (3 answers each); returns its bytes."""
    with ResultStore(path) as store:
        store.put(key("none"), {"accuracy": 1.0, "prefill_flops": 100.0, "latency_ms": 1.0}, answers(3))
        store.put(key(), {"accuracy": 0.8, "prefill_flops": 50.0, "latency_ms": 1.0}, answers(3))
    return path.read_bytes()


def assert_refused(result, message: str, store: Path | None = None, before: bytes | None = None) -> None:
    """Exit 2, exactly one stderr line naming the problem, no traceback, the store untouched."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    if store is not None:
        assert (store.read_bytes() if store.exists() else None) == before


# --- the store matrix: {stored ok, stored failed, nothing} x {new run ok, new run fails} -------------------

INITIAL = {
    "ok": lambda s: s.put(key(), {"accuracy": 0.8}, answers(3)),
    "failed": lambda s: s.put(key(), {}, [], error="RuntimeError: earlier"),
    "nothing": lambda s: None,
}


NOW = "RuntimeError: now"


@pytest.mark.parametrize("initial", list(INITIAL))
@pytest.mark.parametrize("new_run", ["ok", "fails"])
def test_a_put_never_replaces_a_good_row_with_a_failure(tmp_path, initial, new_run):
    with ResultStore(tmp_path / "r.db") as store:
        INITIAL[initial](store)
        if new_run == "ok":
            assert store.put(key(), {"accuracy": 0.4}, answers(3, "blue"))
        else:
            assert store.put(key(), {}, [], error=NOW) is (initial != "ok")
        row, stored = store.row(key()), store.answers(key())
    expected = {  # (status, accuracy, answers, error) afterwards
        ("ok", "ok"): ("ok", 0.4, 3, None), ("ok", "fails"): ("ok", 0.8, 3, None),
        ("failed", "ok"): ("ok", 0.4, 3, None), ("failed", "fails"): ("failed", None, 0, NOW),
        ("nothing", "ok"): ("ok", 0.4, 3, None), ("nothing", "fails"): ("failed", None, 0, NOW),
    }[initial, new_run]
    assert (row["status"], row.get("accuracy"), len(stored), row["error"]) == expected


@pytest.mark.parametrize("initial", list(INITIAL))
@pytest.mark.parametrize("new_run", ["ok", "fails"])
def test_eval_re_runs_never_reduce_what_is_stored(tmp_path, fake, initial, new_run):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        INITIAL[initial](store)
    fake.accuracy = 0.4
    fake.fail = (POOL,) if new_run == "fails" else ()
    result = runner.invoke(app, ["eval", "-p", "pool", "--limit", "3", "--results", str(db), "--json"])
    with ResultStore(db) as store:
        row, stored = store.row(key()), store.answers(key())
    assert POOL in fake.calls  # eval measures the pipeline again whatever is stored
    if new_run == "ok":
        assert result.exit_code == 0, result.output
        assert (row["status"], row["accuracy"], len(stored)) == ("ok", 0.4, 3)
    elif initial == "ok":
        assert_refused(result, f"evaluation of '{POOL}' failed: RuntimeError: boom in {POOL}; the earlier "
                               "successful row is kept")
        assert (row["status"], row["accuracy"], len(stored)) == ("ok", 0.8, 3)
    else:
        assert_refused(result, f"evaluation of '{POOL}' failed: RuntimeError: boom in {POOL}")
        assert (row["status"], row["error"], len(stored)) == ("failed", f"RuntimeError: boom in {POOL}", 0)


@pytest.mark.parametrize("initial", list(INITIAL))
@pytest.mark.parametrize("retry", [False, True])
def test_sweep_skips_stored_rows_and_retries_failed_ones_only_when_asked(tmp_path, fake, initial, retry):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.put(key("none"), {"accuracy": 1.0, "prefill_flops": 100.0, "latency_ms": 1.0}, answers(3))
        INITIAL[initial](store)
    fake.accuracy = 0.4
    result = runner.invoke(app, ["sweep", "-p", "pool", "--limit", "3", "--results", str(db),
                                 *(["--retry-failed"] if retry else [])])
    assert result.exit_code == 0, result.output
    with ResultStore(db) as store:
        row = store.row(key())
    runs = initial == "nothing" or initial == "failed" and retry
    assert fake.calls == ([POOL] if runs else [])  # the stored vanilla row is reused every time
    if initial == "ok":
        assert (row["status"], row["accuracy"]) == ("ok", 0.8) and "stored already" in result.stderr
    elif initial == "failed" and not retry:
        assert row["status"] == "failed" and "--retry-failed runs it again" in result.stderr
    else:
        assert (row["status"], row["accuracy"]) == ("ok", 0.4)


def test_eval_reuses_a_failed_vanilla_row_unless_asked_to_retry_it(tmp_path, fake):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.put(key("none"), {}, [], error="RuntimeError: vanilla broke")
    args = ["eval", "-p", "pool", "--limit", "3", "--results", str(db), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert fake.calls == [POOL] and json.loads(first.stdout)["loyalty"] is None  # no vanilla answers
    assert_refused(runner.invoke(app, ["eval", "-p", "none", "--limit", "3", "--results", str(db)]),
                   "the stored row of 'none' failed (RuntimeError: vanilla broke); --retry-failed runs it "
                   "again")
    again = runner.invoke(app, [*args, "--retry-failed"])
    assert again.exit_code == 0, again.output
    assert fake.calls == [POOL, "none", POOL] and json.loads(again.stdout)["loyalty"] == 1.0
    with ResultStore(db) as store:
        assert store.row(key("none"))["status"] == "ok"


def test_a_failed_sweep_re_run_keeps_the_good_row_and_says_so(tmp_path, fake):
    db = tmp_path / "r.db"
    seeded_store(db)
    fake.fail = (POOL,)
    grid = sweep.Grid(limit=3, items=[sweep.GridItem("pool")])
    out = sweep.run_sweep(grid, db, remeasure=True)
    assert [(r["key"].pipeline, r["error"], r["kept"]) for r in out] == [
        (POOL, f"RuntimeError: boom in {POOL}", True)]
    with ResultStore(db) as store:
        assert store.row(key())["accuracy"] == 0.8 and len(store.answers(key())) == 3


def test_a_damaged_adapter_re_run_keeps_the_good_row(tmp_path):
    """The issue's case, for real on the bundled model: an eval that succeeded, then its adapter file is
    damaged and the eval re-run: one line, exit 2, the 2-answer row stays."""
    from lmmsqueeze.proxyv.attach import adapter_path

    adapter, db = tmp_path / "ad", tmp_path / "r.db"
    shutil.copytree(adapter_path("bundled:proxyv-spatial"), adapter)
    args = ["eval", "--adapter", str(adapter), "--limit", "2", "--results", str(db), "--device", "cpu"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    with ResultStore(db) as store:
        good = [r for r in store.rows() if r["adapter"]]
    assert len(good) == 1 and good[0]["status"] == "ok"
    (adapter / "adapter.safetensors").write_bytes(b"\x00garbage" * 10)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert "the earlier successful row is kept" in again.stderr or "damaged" in again.stderr  # refused first
    with ResultStore(db) as store:
        rows = [r for r in store.rows() if r["adapter"]]
        assert rows == good
        assert len(store.answers(Key("bundled", good[0]["pipeline"], str(adapter), "bundled", 2, 0))) == 2


# --- refusals before any model is loaded ---------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["sweep", "-p", "pool", "--limit", "0"], "--limit must be an integer >= 1 (samples per run), not 0"),
    (["sweep", "-p", "pool", "--limit", "-5"], "--limit must be an integer >= 1 (samples per run), not -5"),
    (["eval", "-p", "pool", "--limit", "0"], "--limit must be an integer >= 1 (samples per run), not 0"),
    (["eval", "-p", "pool", "--limit", "-5"], "--limit must be an integer >= 1"),
    (["sweep", "-p", "fastv(keep=0)"], "keep=0 keeps no token"),
    (["sweep", "-p", "pool", "-p", "fastv(layer=99)"], "layer=99 is beyond the model"),
    (["sweep", "-p", "fastv(layer=99)", "-p", "fastv(layer=98)"], "error: 'fastv(layer=99)': "),
    (["sweep", "-p", "fastv(layer=99)", "-p", "fastv(layer=98)"], "(1 more refused); nothing was run"),
    (["sweep", "-p", "pool", "--plot", "{tmp}/p.txt"], "file type '.txt' is not supported; end it in .png"),
    (["sweep", "-p", "pool", "--plot", "{tmp}/plot"], "a name without a file type is not supported"),
    (["sweep", "-p", "pool", "--plot", "{tmp}/no/such/p.png"], "the folder"),
    (["sweep", "-p", "pool", "--plot", "{tmp}"], "it is a folder"),
    (["sweep", "-p", "pool", "--results", "{tmp}/no/such/r.db"], "the folder"),
    (["sweep", "-p", "pool", "--results", "{tmp}"], "is a folder"),
    (["eval", "-p", "pool", "--results", "{tmp}"], "is a folder"),
    (["sweep", "-p", "pool", "--device", "nonsense"], "unknown device 'nonsense'; give --device one of"),
    (["eval", "-p", "pool", "--device", "cpu:3"], "device 'cpu:3'"),
])
def test_bad_options_are_refused_before_a_model_is_loaded(tmp_path, no_model, args, message):
    db = tmp_path / "r.db"
    before = seeded_store(db)
    if "--results" not in args:
        args = [*args, "--results", str(db)]
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert_refused(result, message, db, before)


GRIDS = {  # grid file text -> what the one line says
    "pipelines: [pool\n": "cannot read grid file",
    "pipelines:\n  - pool\n bad indent: [\n": "cannot read grid file",
    "- pool\n- fastv\n": "needs a `pipelines:` list",
    "": "needs a `pipelines:` list",
    "pipelines: []\n": "`pipelines` is empty",
    "pipelines: [pool]\nmodels: x\n": "unknown keys ['models']",
    "pipelines: [pool]\nlimit: 0\n": "`limit` must be an integer >= 1 (samples per run), not 0",
    "pipelines: [pool]\nlimit: -5\n": "`limit` must be an integer >= 1 (samples per run), not -5",
    "pipelines: [pool]\nlimit: abc\n": "`limit` must be an integer >= 1 (samples per run), not 'abc'",
    "pipelines: [pool]\nlimit: 2.5\n": "`limit` must be an integer >= 1 (samples per run), not 2.5",
    "pipelines: [pool]\nlimit: true\n": "`limit` must be an integer >= 1 (samples per run), not True",
    "pipelines: [pool]\nlimit: [3]\n": "`limit` must be an integer >= 1",
    "pipelines: [pool]\nseed: -1\n": "`seed` must be an integer >= 0, not -1",
    "pipelines: [pool]\nseed: x\n": "`seed` must be an integer >= 0, not 'x'",
    "pipelines: [pool]\ntasks: 3\n": "`tasks` must be a task name or a list of task names, not 3",
    "pipelines: [pool]\ntasks: [bundled, 1]\n": "`tasks` must be a task name or a list",
    "pipelines: [pool]\ntasks: []\n": "`tasks` must be a task name or a list",
    "pipelines: [pool]\ntask: bundled\ntasks: [bundled]\n": "give `tasks` or `task`, not both",
    "pipelines: [pool]\ntasks: [vqa9000]\n": "unknown task 'vqa9000'",
    "pipelines: [pool]\nmodel: [a, b]\n": "`model` must be a model directory or `bundled`, not ['a', 'b']",
    "pipelines: [pool]\nmodel: /no/such/model\n": "is not a local model directory",
    "pipelines: [{pipeline: 3}]\n": "entry 1 ({'pipeline': 3}) must be a pipeline string or a mapping",
    "pipelines: [pool, {adapter: [x]}]\n": "entry 2 ({'adapter': ['x']}) must be a pipeline string",
    "pipelines: [pool, {name: pool}]\n": "entry 2 ({'name': 'pool'}) must be a pipeline string",
    "pipelines: ['fastv(keep=0)']\n": "keep=0 keeps no token",
    "pipelines: ['fastv(kep=1)']\n": "unknown parameter 'kep'",
    "pipelines: ['fastv(layer=99)']\n": "layer=99 is beyond the model",
    f"pipelines: [{{adapter: [{'x' * 5000}]}}]\n": "entry 1 ({'adapter': ['xxxxxxx",
}


@pytest.mark.parametrize("text", list(GRIDS), ids=[f"grid{i}" for i in range(len(GRIDS))])
def test_bad_grid_files_are_one_line_and_leave_the_store_alone(tmp_path, no_model, text):
    db, grid = tmp_path / "r.db", tmp_path / "g.yaml"
    before = seeded_store(db)
    grid.write_text(text)
    result = runner.invoke(app, ["sweep", "--grid", str(grid), "--results", str(db)])
    assert_refused(result, GRIDS[text], db, before)
    assert len(result.stderr) < 800  # a long bad entry is not echoed whole


@pytest.mark.parametrize("name, content, message", [
    ("g.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", "is not a UTF-8 text file"),
    ("g.json", b'{"pipelines": ["pool"', "cannot read grid file"),
    ("g.json", b'["pool"]', "needs a `pipelines:` list"),
    ("g.json", b'{"pipelines": ["pool"], "limit": "10"}',
     "`limit` must be an integer >= 1 (samples per run), not '10'"),
    ("g.yaml", b"pipelines: [pool]\nlimit: !!python/object:os.system {}\n", "cannot read grid file"),
    ("folder", None, "is not a file"),
])
def test_unreadable_grid_files_are_one_line(tmp_path, no_model, name, content, message):
    db, grid = tmp_path / "r.db", tmp_path / name
    before = seeded_store(db)
    if content is None:
        grid.mkdir()
    else:
        grid.write_bytes(content)
    result = runner.invoke(app, ["sweep", "--grid", str(grid), "--results", str(db)])
    assert_refused(result, message, db, before)


def test_grid_limit_from_a_file_runs_that_many_samples(tmp_path, fake):
    grid = tmp_path / "g.yaml"
    grid.write_text("pipelines: [pool]\nlimit: 2\nseed: 1\n")
    result = runner.invoke(app, ["sweep", "--grid", str(grid), "--results", str(tmp_path / "r.db")])
    assert result.exit_code == 0, result.output
    with ResultStore(tmp_path / "r.db") as store:
        assert sorted((r["pipeline"], r["limit"], r["seed"], r["status"]) for r in store.rows()) == [
            ("none", 2, 1, "ok"), (POOL, 2, 1, "ok")]


# --- damaged, foreign and read-only store files ---------------------------------------------------------

def damaged_store(tmp_path: Path) -> Path:
    """A store whose `runs` table pages are overwritten: SQLite opens it, but reads fail."""
    path = tmp_path / "damaged.db"
    with ResultStore(path) as store:
        for i in range(60):  # rows enough for several pages
            store.put(key(f"random(keep={i + 1}, seed=0)"), {"accuracy": 0.5, "note": "x" * 300}, answers(2))
    with sqlite3.connect(path) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name='runs'").fetchone()[0]
    data = bytearray(path.read_bytes())
    data[(root - 1) * 4096:(root - 1) * 4096 + 64] = b"\x07" * 64
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("command", [["pareto"], ["sweep", "-p", "pool"], ["eval", "-p", "pool"]])
@pytest.mark.parametrize("kind, message", [
    ("junk", "is not a lmmsqueeze results file: file is not a database"),
    ("damaged", "cannot be used (database disk image is malformed); if it is damaged, move it away"),
    ("foreign", "is not a lmmsqueeze results file (an SQLite file without its `runs` table)"),
])
def test_bad_store_files_are_one_line_and_left_as_they_are(tmp_path, no_model, command, kind, message):
    if kind == "junk":
        path = tmp_path / "junk.db"
        path.write_bytes(os.urandom(3000))
    elif kind == "damaged":
        path = damaged_store(tmp_path)
    else:
        path = tmp_path / "other-app.db"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE notes (text TEXT)")
        sqlite3.connect(path).close()
    before = path.read_bytes()
    assert_refused(runner.invoke(app, [*command, "--results", str(path)]), message, path, before)


def test_pareto_reads_without_writing(tmp_path):
    db = tmp_path / "r.db"
    before = seeded_store(db)
    result = runner.invoke(app, ["pareto", "--results", str(db)])
    assert result.exit_code == 0, result.output
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.db"]
    with ResultStore(db, readonly=True) as store, pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.db.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")


def test_a_store_sqlite_may_not_lock_is_read_as_immutable(tmp_path, monkeypatch):
    """A WAL store in a file or folder the user may not write: SQLite refuses a plain read-only open
    ("attempt to write a readonly database"); the store then reads it as immutable."""
    from lmmsqueeze.evaluation import store as store_module

    db = tmp_path / "r.db"
    seeded_store(db)
    real_connect, uris = sqlite3.connect, []

    class Refusing:  # what SQLite answers on a read-only WAL file it cannot lock
        def __init__(self, connection):
            self.connection = connection

        def execute(self, *args):
            raise sqlite3.OperationalError("attempt to write a readonly database")

        def close(self):
            self.connection.close()

    def connect(database, **kwargs):
        uris.append(database)
        connection = real_connect(database, **kwargs)
        return connection if "immutable=1" in database else Refusing(connection)

    monkeypatch.setattr(store_module.sqlite3, "connect", connect)
    monkeypatch.setattr(store_module.os, "access", lambda *args: False)  # as for a user who may not write
    with ResultStore(db, readonly=True) as store:
        assert [r["pipeline"] for r in store.rows()] == ["none", POOL]
    assert uris[-1].endswith("?mode=ro&immutable=1") and uris[0].endswith("?mode=ro")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write any file")
def test_a_read_only_store_is_read_by_pareto_and_refused_by_sweep(tmp_path, no_model):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "r.db"
    before = seeded_store(db)
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        result = runner.invoke(app, ["pareto", "--results", str(db)])
        assert result.exit_code == 0 and POOL in result.stdout, result.output
        assert_refused(runner.invoke(app, ["sweep", "-p", "pool", "--results", str(db)]), "is read-only",
                       db, before)
    finally:
        folder.chmod(0o755)


def test_store_errors_during_use_are_one_line(tmp_path):
    db = tmp_path / "r.db"
    seeded_store(db)
    with ResultStore(db) as store:
        store.db.execute("DROP TABLE answers")
        with pytest.raises(LmmsqueezeError, match="cannot be used .*no such table: answers"):
            store.answers(key())


# --- pareto output ---------------------------------------------------------------------------------------

def test_user_strings_print_literally_and_never_as_markup(tmp_path):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.put(Key("/m/[bold]x", "none", "", "bundled", 3, 0), {"accuracy": 0.9, "prefill_flops": 10.0,
                                                                    "latency_ms": 1.0}, answers(3))
        for adapter in ("[/data/run1/ad]", "bundled:proxyv-spatial", "/data/[red]ad"):
            store.put(Key("/m/[bold]x", "proxyv(layer=1)", adapter, "bundled", 3, 0),
                      {"accuracy": 0.8, "prefill_flops": 5.0, "latency_ms": 1.0}, answers(3))
        store.put(Key("/m/[bold]x", "pool(size=2)", "", "bundled", 3, 0), {}, error="Boom: [/red] [link]")
    result = runner.invoke(app, ["pareto", "--results", str(db)])
    assert result.exit_code == 0, result.output
    for text in ("proxyv(layer=1) [[/data/run1/ad]]", "proxyv(layer=1) [bundled:proxyv-spatial]",
                 "proxyv(layer=1) [/data/[red]ad]", "bundled on /m/[bold]x (3 samples"):
        assert text in result.stdout, result.stdout
    assert "failed: pool(size=2) (bundled): Boom: [/red] [link]" in result.stderr


def test_sweep_shows_and_plots_only_the_group_it_swept(tmp_path, fake, monkeypatch):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:  # another group (5 samples) already in the store
        for pipeline in ("none", "fastv(keep=0.5, layer=2)"):
            store.put(key(pipeline, limit=5), {"accuracy": 0.7, "prefill_flops": 80.0, "latency_ms": 1.0},
                      answers(5))
    drawn = []
    monkeypatch.setattr(pareto, "plot", lambda rows, path, x, title: drawn.append(
        (sorted(r["pipeline"] for r in rows), path, title)))
    result = runner.invoke(app, ["sweep", "-p", "pool", "--limit", "3", "--results", str(db),
                                 "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "(3 samples, seed 0)" in result.stdout and "5 samples" not in result.stdout
    assert "fastv" not in result.stdout
    assert drawn == [(["none", POOL], str(tmp_path / "p.png"), "bundled model and task (3 samples, seed 0)")]
    every = runner.invoke(app, ["pareto", "--results", str(db)])  # pareto alone shows both groups
    assert "(3 samples, seed 0)" in every.stdout and "(5 samples, seed 0)" in every.stdout


def test_pareto_plots_one_file_per_group_and_filters(tmp_path, monkeypatch):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        for limit in (3, 5):
            store.put(key("none", limit=limit), {"accuracy": 0.7, "prefill_flops": 80.0, "latency_ms": 1.0},
                      answers(limit))
    drawn = []
    monkeypatch.setattr(pareto, "plot", lambda rows, path, x, title: drawn.append((path, title)))
    result = runner.invoke(app, ["pareto", "--results", str(db), "--plot", str(tmp_path / "p.svg")])
    assert result.exit_code == 0, result.output
    assert drawn == [(str(tmp_path / "p-1.svg"), "bundled model and task (3 samples, seed 0)"),
                     (str(tmp_path / "p-2.svg"), "bundled model and task (5 samples, seed 0)")]
    only = runner.invoke(app, ["pareto", "--results", str(db), "--limit", "5", "--format", "json"])
    assert [r["pipeline"] for r in json.loads(only.stdout)] == ["none"]
    assert_refused(runner.invoke(app, ["pareto", "--results", str(db), "--seed", "7"]),
                   "no results matching the filters")
    assert_refused(runner.invoke(app, ["pareto", "--results", str(db), "--x", "time"]),
                   "--x 'time' must be one of flops, latency")


def test_plot_titles_name_model_and_task_once():
    assert pareto.plot_title("bundled", "bundled", 20, 0) == "bundled model and task (20 samples, seed 0)"
    assert pareto.plot_title("/data/llava-1.5-7b/", "bundled", 5, 1) == (
        "bundled on llava-1.5-7b (5 samples, seed 1)")


def test_plot_labels_do_not_overlap_and_the_key_names_every_pipeline_whole():
    """Crowded points (several at the same place) and long ProxyV pipelines with adapters: every point
    gets a number, no two labels overlap, and the key holds every pipeline in full."""
    import matplotlib.pyplot as plt

    rows = [{"pipeline": "none", "adapter": "", "accuracy": 0.9, "prefill_flops": 600e6, "saving": 0.0}]
    for i in range(18):
        flops, acc = (100e6, 110e6, 300e6)[i % 3], (0.70, 0.71, 0.85)[i % 3 if i < 9 else 0]
        rows.append({"pipeline": f"visionzip(dominant={i}) | proxyv(layer=1, variant=nonspatial, proxies=16)",
                     "adapter": "[/data/run1/ad]" if i % 2 else "", "accuracy": acc, "prefill_flops": flops,
                     "saving": 1 - flops / 600e6})
    best = pareto.pareto_rows(rows)
    fig = pareto.figure(best, "flops", "t")
    try:
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        numbers = [t for t in ax.texts if t.get_text().replace(",", "").isdigit()]
        labelled = sorted(int(n) for t in numbers for n in t.get_text().split(","))
        assert labelled == list(range(1, len(best) + 1))
        boxes = [t.get_window_extent(renderer) for t in numbers]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        key_text = " ".join(t.get_text().strip() for t in ax.texts if t not in numbers)
        for r in best:
            whole = r["pipeline"] + (f" [{r['adapter']}]" if r["adapter"] else "")
            assert whole in " ".join(key_text.split()), whole
    finally:
        plt.close(fig)


def test_a_plot_is_written_in_the_type_its_name_asks_for(tmp_path):
    rows = pareto.pareto_rows([
        {"pipeline": "none", "adapter": "", "accuracy": 0.9, "prefill_flops": 6e8},
        {"pipeline": "pool(size=2)", "adapter": "", "accuracy": 0.5, "prefill_flops": 2e8}])
    for name, magic in (("p.png", b"\x89PNG"), ("p.svg", b"<?xml"), ("p.pdf", b"%PDF")):
        pareto.plot(rows, str(tmp_path / name), "flops", "t")
        assert (tmp_path / name).read_bytes().startswith(magic)


def test_latencies_measured_on_a_busy_machine_are_marked(tmp_path):
    """A row whose metrics say the machine was busy shows its latency marked ``!`` with the footnote, in
    the terminal and in Markdown; the others are unmarked."""
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.put(key("none"), {"accuracy": 0.9, "prefill_flops": 10.0, "latency_ms": 2.0, "busy": False},
                  answers(3))
        store.put(key("pool(size=2)"), {"accuracy": 0.5, "prefill_flops": 4.0, "latency_ms": 7.25,
                                         "busy": True}, answers(3))
    for fmt in ("table", "markdown"):
        result = runner.invoke(app, ["pareto", "--results", str(db), "--format", fmt])
        assert result.exit_code == 0, result.output
        out = " ".join(result.stdout.split())
        assert "7.25 !" in out and "2 !" not in out and "kept the CPU busy" in out, result.stdout
    with ResultStore(db) as store:
        store.put(key("pool(size=2)"), {"accuracy": 0.5, "prefill_flops": 4.0, "latency_ms": 7.25,
                                         "busy": False}, answers(3))
    result = runner.invoke(app, ["pareto", "--results", str(db)])
    assert "!" not in result.stdout and "busy" not in result.stdout
