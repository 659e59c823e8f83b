"""The README's scaling table is printed by ``benchmarks/scaling.py --summary``: these check that it reports
what the runs measured (median of repeated runs' medians, later runs replacing only the rows they take)."""

from __future__ import annotations

import json
import statistics

from benchmarks.scaling import load_update, repeated, summary


def _row(pipeline: str, realized: float | None, rounds: list[float] | None, peak: float, rss: float) -> dict:
    return {"pipeline": pipeline, "realized_fraction": realized, "realized_runs": rounds,
            "overhead_fraction": 0.01, "analytic_overhead_fraction": 0.0, "peak_memory_mb": peak,
            "peak_rss_mb": rss}


def _run(realized: dict[str, float], base_peak: float = 100.0) -> dict:
    rows = [_row("none", None, None, base_peak, 2 * base_peak)]
    rows += [_row(p, r, [r - 0.05, r, r + 0.05], base_peak / 2, base_peak) for p, r in realized.items()]
    return {"sizes": [{"image_tokens": 576, "machine": {"busy": False}, "rows": rows}]}


def _cells(table: str) -> dict[str, list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    return {line.split("`")[1]: [c.strip() for c in line.split("|")[2:-1]] for line in lines}


def test_repeats_give_the_median_of_the_runs_medians_and_their_range():
    merged = repeated(_run({"a": 0.90}), _run({"a": 0.99}), _run({"a": 0.95}))
    row = merged["sizes"][0]["rows"][1]
    assert row["realized_fraction"] == statistics.median([0.90, 0.99, 0.95])
    assert sorted(row["realized_runs"]) == [0.90, 0.95, 0.99]


def test_an_update_group_of_repeats_replaces_only_the_rows_it_takes(tmp_path):
    paths = []
    for i, value in enumerate([0.96, 0.93, 0.99]):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(_run({"proxyv(x)": value, "fastv(y)": 0.5}, base_peak=50.0)))
        paths.append(str(path))
    update = load_update(",".join(paths))
    table = _cells(summary(_run({"fastv(y)": 1.01, "proxyv(x)": 0.80}), update, take=["proxyv"]))
    assert table["fastv(y)"][0] == "1.01 (0.96-1.06)"  # not taken: the first run's median and rounds
    assert table["proxyv(x) †"][0] == "0.96 (0.93-0.99)"  # the update's three runs: median, their range
    # memory relative to the update's own vanilla, carried onto the table's vanilla: 25/50 -> 0.50
    assert table["proxyv(x) †"][-2:] == ["0.50", "0.50"]
