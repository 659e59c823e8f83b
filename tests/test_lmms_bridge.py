"""The lmms-eval bridge, offline: exported task, entry-point model, metric stored like native runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from typer.testing import CliRunner  # noqa: E402

from lmmsqueeze.cli import app  # noqa: E402
from lmmsqueeze.evaluation.store import ResultStore  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def bundled_shaped(tmp_path_factory):
    """An untrained model with the bundled vocabulary, so predictions are real words."""
    from lmmsqueeze.bundled.model import TinyConfig, build_model, build_processor

    path = tmp_path_factory.mktemp("bundled-shaped")
    build_model(TinyConfig(text_layers=2, vision_layers=1), seed=3).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


@pytest.mark.slow
def test_lmms_eval_cli_matches_lmmsqueeze_eval(bundled_shaped, tmp_path):
    task_dir = tmp_path / "task"
    exported = runner.invoke(app, ["export-lmms-task", str(task_dir), "--limit", "8"])
    assert exported.exit_code == 0, exported.output
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "lmms-out"
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "lmmsqueeze",
         "--model_args", f"pretrained={bundled_shaped},pipeline=pool", "--tasks", "lmmsqueeze_bundled",
         "--include_path", str(task_dir), "--limit", "8", "--batch_size", "1", "--device", "cpu",
         "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=900)
    # the lmms-eval CLI exits 0 even when evaluation fails: the results file is the real signal
    results = list(out.rglob("*_results.json"))
    assert results, proc.stdout[-2000:] + proc.stderr[-2000:]
    metric = json.loads(results[0].read_text())["results"]["lmmsqueeze_bundled"]["exact_match,none"]
    samples = [json.loads(line) for f in out.rglob("*_samples_*.jsonl")
               for line in f.read_text().splitlines()]
    lmms_predictions = {s["doc_id"]: s["filtered_resps"] for s in samples}

    native = runner.invoke(app, ["eval", "-m", str(bundled_shaped), "-p", "pool", "--limit", "8",
                                 "--results", str(tmp_path / "r.db"), "--json"])
    assert native.exit_code == 0, native.output
    row = json.loads(native.stdout)
    assert row["accuracy"] == pytest.approx(metric)
    with ResultStore(tmp_path / "r.db") as store:
        from lmmsqueeze.evaluation.store import Key

        answers = store.answers(Key(str(bundled_shaped), "pool(size=2)", "", "bundled", 8, 0))
    assert {i: a["prediction"] for i, a in enumerate(answers)} == lmms_predictions
    assert any(p for p in lmms_predictions.values())  # real words, not empty strings

    bridged = runner.invoke(app, ["eval", "-m", str(bundled_shaped), "-p", "pool",
                                  "--task", "lmms:lmmsqueeze_bundled", "--include-path", str(task_dir),
                                  "--limit", "8", "--results", str(tmp_path / "r.db"), "--json"])
    assert bridged.exit_code == 0, bridged.output
    assert json.loads(bridged.stdout)["accuracy"] == pytest.approx(metric)
    with ResultStore(tmp_path / "r.db") as store:
        tasks = {r["task"] for r in store.rows()}
    assert tasks == {"bundled", "lmms:lmmsqueeze_bundled"}


def test_unknown_lmms_task_is_one_line(bundled_shaped, tmp_path):
    result = runner.invoke(app, ["eval", "-m", str(bundled_shaped), "--task", "lmms:no_such_task",
                                 "--limit", "2", "--results", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "lmms-eval knows no task 'no_such_task'" in result.stderr
