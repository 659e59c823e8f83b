"""Data parallel: two CPU ranks (gloo) store rows equal, answer by answer, to a single process's (vanilla,
an llm reducer, a ProxyV adapter); a rank that raises makes the row failed with its error; a rank killed
with SIGKILL leaves no partial row and a rerun completes it. The ranks are real processes started by
torch's elastic launcher (``--processes 2`` on the CLI, :func:`lmmsqueeze.evaluation.launch.launch`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmmsqueeze.cli import app
from lmmsqueeze.errors import LmmsqueezeError
from lmmsqueeze.evaluation import distributed
from lmmsqueeze.evaluation.launch import launch
from lmmsqueeze.evaluation.shards import MEASURED
from lmmsqueeze.evaluation.store import ResultStore
from lmmsqueeze.evaluation.sweep import Grid, GridItem

runner = CliRunner()
GRID = """\
model: bundled
tasks: [bundled]
limit: 5
pipelines:
  - fastv(layer=2, keep=0.5)
  - {adapter: "bundled:proxyv-spatial"}
"""


def stored(path: Path) -> dict:
    """Every row of a store by key: status, error, metrics minus what measures the machine, answers."""
    with ResultStore(path, readonly=True) as store:
        return {key: (status, error, {k: v for k, v in metrics.items() if k not in MEASURED}, answers)
                for key, status, error, metrics, answers in store.records()}


def test_two_processes_store_the_rows_of_one_process_answer_by_answer(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    for name, extra in (("one.db", []), ("two.db", ["--processes", "2"])):
        result = runner.invoke(app, ["sweep", "--grid", str(grid), "--results", str(tmp_path / name),
                                     "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
    one, two = stored(tmp_path / "one.db"), stored(tmp_path / "two.db")
    spatial = "proxyv(factor=3, layer=1, mlp_hidden=0, proxies=36, variant=spatial)"
    assert len(one) == 3 and {key.pipeline for key in one} == {"none", "fastv(keep=0.5, layer=2)", spatial}
    assert one == two  # answers in sample order, accuracy, per-type accuracy, FLOPs, token counts, loyalty
    for key, (status, _, metrics, answers) in two.items():
        assert status == "ok" and len(answers) == 5 and metrics["n"] == 5, key
    with ResultStore(tmp_path / "two.db", readonly=True) as store:
        assert {row["processes"] for row in store.rows()} == {2}  # really measured on two ranks


def test_rank_device_and_world_come_from_the_launchers_environment():
    assert distributed.world({}) is None and distributed.world({"WORLD_SIZE": "1"}) is None
    here = distributed.world({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (here.rank, here.size, here.local_rank, here.main) == (3, 4, 1, False)
    with pytest.raises(LmmsqueezeError, match="RANK=4 is not below WORLD_SIZE=4"):
        distributed.world({"WORLD_SIZE": "4", "RANK": "4"})
    assert distributed.rank_device("cpu", here) == "cpu"


def _grid() -> Grid:
    return Grid(model="bundled", tasks=["bundled"], limit=4, items=[GridItem("fastv(layer=2, keep=0.5)")])


def _failing_rank(store: str) -> list:
    """A rank of a launched run where rank 1 raises on its shard of every run but vanilla."""
    if os.environ["RANK"] == "1":
        measure = distributed.measure

        def failing(model, processor, pipeline, *args, **kwargs):
            if str(pipeline) != "none":
                raise RuntimeError("rank one ran out of luck")
            return measure(model, processor, pipeline, *args, **kwargs)

        distributed.measure = failing
    return distributed.run_sweep_ranks(_grid(), store, device="cpu")


def _killed_rank(store: str) -> list:
    """A rank of a launched run where rank 1 kills itself (SIGKILL) after a first sample of the fastv run."""
    if os.environ["RANK"] == "1":
        measure = distributed.measure

        def dying(model, processor, pipeline, task, limit, seed, adapter, batch_size, on_progress, **kw):
            def progress(done, total):
                on_progress(done, total)
                if str(pipeline) != "none":
                    os.kill(os.getpid(), signal.SIGKILL)
            return measure(model, processor, pipeline, task, limit, seed, adapter, batch_size, progress, **kw)

        distributed.measure = dying
    return distributed.run_sweep_ranks(_grid(), store, device="cpu")


@pytest.mark.slow
def test_a_rank_that_raises_makes_the_row_failed_with_its_error(tmp_path):
    store = tmp_path / "r.db"
    results = launch(2, _failing_rank, str(store))
    assert results[1] == []  # only rank 0 returns the sweep's rows
    rows = {key.pipeline: (status, error, answers)
            for key, (status, error, _, answers) in stored(store).items()}
    assert rows["none"][0] == "ok" and len(rows["none"][2]) == 4
    status, error, answers = rows["fastv(keep=0.5, layer=2)"]
    assert status == "failed" and answers == []
    assert "rank 1 of 2: RuntimeError: rank one ran out of luck" in error and "\n" not in error


@pytest.mark.slow
def test_a_rank_killed_leaves_no_partial_row_and_a_rerun_completes_it(tmp_path):
    store = tmp_path / "r.db"
    with pytest.raises(LmmsqueezeError, match="rank 1 of 2 stopped .killed by SIGKILL.; .* no partial row"):
        launch(2, _killed_rank, str(store))
    rows = stored(store)
    assert [key.pipeline for key in rows] == ["none"]  # vanilla ran before; nothing of the fastv run
    rerun = runner.invoke(app, ["sweep", "-p", "fastv(layer=2, keep=0.5)", "--limit", "4", "--results",
                                str(store), "--device", "cpu", "--processes", "2"])
    assert rerun.exit_code == 0, rerun.output
    single = tmp_path / "single.db"
    assert runner.invoke(app, ["sweep", "-p", "fastv(layer=2, keep=0.5)", "--limit", "4", "--results",
                               str(single), "--device", "cpu"]).exit_code == 0
    assert stored(store) == stored(single)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA devices (.ci/gpu runs it on a machine with two)")


@TWO_GPUS
@pytest.mark.parametrize("launcher", ["processes", "accelerate"])
def test_two_gpus_store_the_rows_of_one_gpu_answer_by_answer(tmp_path, launcher):
    import subprocess
    import sys

    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.replace("limit: 5", "limit: 16"))
    sweep = ["sweep", "--grid", str(grid), "--device", "cuda"]
    result = runner.invoke(app, [*sweep, "--results", str(tmp_path / "one.db")])
    assert result.exit_code == 0, result.output
    two = tmp_path / "two.db"
    if launcher == "processes":
        result = runner.invoke(app, [*sweep, "--results", str(two), "--processes", "2"])
        assert result.exit_code == 0, result.output
    else:
        accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                      "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        done = subprocess.run([*accelerate, "-m", "lmmsqueeze", *sweep, "--results", str(two)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert stored(two) == stored(tmp_path / "one.db")
    with ResultStore(two, readonly=True) as store:
        assert {row["processes"] for row in store.rows()} == {2}


def test_cpu_threads_are_shared_by_the_local_ranks():
    from lmmsqueeze.machine import physical_cores, usable_cpus
    from lmmsqueeze.runtime.threads import choose_threads

    cores = physical_cores(usable_cpus())
    alone = choose_threads(10**9, in_use=0.0, environ={}, user_chose=False)
    shared = choose_threads(10**9, in_use=0.0, environ={"LOCAL_WORLD_SIZE": "2"}, user_chose=False)
    assert alone.threads == cores and shared.threads == max(1, cores // 2)
    assert choose_threads(10**6, in_use=0.0, environ={"LOCAL_WORLD_SIZE": "2"}, user_chose=False).threads == 1


def _late_rank_zero(store: str) -> list:
    """Rank 0 starts its shard 3 s late; returns what rank 0's progress display was told."""
    import time

    seen: list = []
    if os.environ["RANK"] == "0":
        measure = distributed.measure

        def late(*args, **kwargs):
            time.sleep(3)
            return measure(*args, **kwargs)

        distributed.measure = late
    grid = Grid(model="bundled", tasks=["bundled"], limit=6, items=[])
    distributed.run_sweep_ranks(grid, store, device="cpu",
                                on_event=lambda kind, info: seen.append((kind, info.get("done"))))
    return seen


@pytest.mark.slow
def test_rank_zeros_progress_counts_the_samples_of_every_rank(tmp_path):
    seen = launch(2, _late_rank_zero, str(tmp_path / "r.db"))[0]
    done = [d for kind, d in seen if kind == "progress"]
    # rank 1 answered its 3 samples while rank 0 waited: rank 0's first sample already shows 4 of 6
    assert done[0] >= 4 and done == sorted(done) and done[-1] == 6


def test_the_collectives_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout() == distributed.DEFAULT_TIMEOUT
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.timeout() == 90
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(LmmsqueezeError, match="is not a number of seconds > 0"):
            distributed.timeout()
