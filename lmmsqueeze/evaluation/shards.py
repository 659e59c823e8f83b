"""Many machines: a sweep grid split deterministically into shards (``sweep --shard I/N``), and results stores
merged back into one (``lmmsqueeze results merge``).

A shard runs every N-th (task, pipeline, adapter) row of the grid, counted from its I-th in the rows' sorted
order, so the split depends on the grid alone (not on the order of its file, nor on the machine); every
shard that runs rows of a task also runs that task's vanilla row (loyalty is measured against it), and
merging keeps one vanilla row per task. A merge copies rows by key: a key the target lacks is added, the
same row again (equal in everything but the measured timings and machine load) changes nothing, an ok row
replaces a failed one and is never replaced by one, and two ok rows that differ are a conflict: reported,
and the row already there is kept. Merging the same stores again changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import LmmsqueezeError
from .store import Key, ResultStore
from .sweep import Grid, GridItem, check_sweep

#: metrics that measure the machine and the moment, not the result: equal rows may differ in them
MEASURED = frozenset({"latency_ms", "peak_memory_mb", "threads", "cpu_cores", "loadavg_before",
                      "loadavg_after", "others_cpu", "busy", "processes", "versions"})
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as (I, N) with 1 <= I <= N; anything else is a one-line error naming it."""
    found = _SHARD.match(str(text))
    if not found or not 1 <= int(found[1]) <= int(found[2]):
        raise LmmsqueezeError(f"--shard {text!r} is not I/N with 1 <= I <= N (shard I of N, counted from 1); "
                              "give e.g. --shard 1/4 ... --shard 4/4")
    return int(found[1]), int(found[2])


def shard_grids(grid: Grid, index: int, count: int) -> list[Grid]:
    """Shard ``index`` of ``count`` (from 1) of ``grid``: one grid per task that has rows in it (its vanilla
    row runs with them). The shards of a grid are disjoint and together hold every row."""
    parse_shard(f"{index}/{count}")
    canonical = check_sweep(grid)
    rows = sorted({(task, canonical[item], item.adapter or ""): item for task in grid.tasks
                   for item in canonical if item != GridItem("none")}.items())
    mine = [(key[0], item) for key, item in rows[index - 1::count]]
    return [replace(grid, tasks=[task], items=[item for t, item in mine if t == task])
            for task in dict.fromkeys(t for t, _ in mine)]


@dataclass
class MergeReport:
    """What a merge did: rows ``added`` (new keys), ``same`` (already there), ``replaced`` (an ok row
    over a failed one), ``kept`` (a failed row not copied over an ok one, or over another failed one) and
    ``conflicts``: (key, the source, the fields that differ) of ok rows that differ from the kept one."""

    added: int = 0
    same: int = 0
    replaced: int = 0
    kept: int = 0
    conflicts: list[tuple[Key, str, list[str]]] = field(default_factory=list)


def _content(metrics: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, Any]:
    return {**{k: v for k, v in metrics.items() if k not in MEASURED}, "answers": answers}


def _differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def merge_stores(sources: list[str | Path], target: str | Path) -> MergeReport:
    """Merge the rows of ``sources`` (in order) into the store ``target`` (created when missing). Every
    source is opened (and refused in one line when missing or damaged) before anything is written."""
    if not sources:
        raise LmmsqueezeError("give the results files to merge, e.g. lmmsqueeze results merge A.db B.db "
                              "-o ALL.db")
    opened = []
    try:
        for source in sources:
            opened.append(ResultStore(source, readonly=True))
        report = MergeReport()
        with ResultStore(target) as out:
            for store in opened:
                for key, status, error, metrics, answers in store.records():
                    _merge_row(out, report, str(store.path), key, status, error, metrics, answers)
        return report
    finally:
        for store in opened:
            store.close()


def _merge_row(out: ResultStore, report: MergeReport, source: str, key: Key, status: str, error: str | None,
               metrics: dict[str, Any], answers: list[dict[str, Any]]) -> None:
    held = out.record(key)
    if held is None:
        out.put(key, metrics, answers, error=error if status != "ok" else None)
        report.added += 1
    elif held[0] == "ok" and status == "ok":
        differ = _differ(_content(held[2], held[3]), _content(metrics, answers))
        if differ:
            report.conflicts.append((key, source, differ))
        else:
            report.same += 1
    elif status == "ok":  # an ok row beats the failed one held
        out.put(key, metrics, answers)
        report.replaced += 1
    elif held[0] == "failed" and held[1] == error:
        report.same += 1
    else:  # a failed row never replaces anything
        report.kept += 1
