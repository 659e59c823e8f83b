"""The results store: one SQLite file (WAL), one row per (model, pipeline, adapter, task, limit, seed).

Every row is written in one transaction together with its per-sample answers, so a process killed
at any moment leaves either the whole row or nothing, and the same sweep run again skips what is
already there. Answers are kept so loyalty and re-scoring need no rerun.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LmmsqueezeError

DEFAULT_PATH = "lmmsqueeze-results.db"

#: the behaviour of the built-in methods a store's rows were measured with; bumped whenever a method's
#: selection or positions change for the same pipeline string (2: every method follows its released code)
SEMANTICS = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    adapter TEXT NOT NULL DEFAULT '',
    task TEXT NOT NULL,
    limit_n INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    accuracy REAL,
    metrics TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (model, pipeline, adapter, task, limit_n, seed)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    uid TEXT NOT NULL,
    qtype TEXT NOT NULL,
    prediction TEXT NOT NULL,
    answer TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
"""


@dataclass(frozen=True)
class Key:
    """The identity of a result row."""

    model: str
    pipeline: str
    adapter: str
    task: str
    limit: int
    seed: int


_KEY_WHERE = "model=? AND pipeline=? AND adapter=? AND task=? AND limit_n=? AND seed=?"


def _key_args(key: Key) -> tuple[Any, ...]:
    return key.model, key.pipeline, key.adapter, key.task, key.limit, key.seed


class ResultStore:
    """Read and write results; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path = DEFAULT_PATH, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LmmsqueezeError(
                f"results file {str(self.path)!r} does not exist; run `lmmsqueeze eval` or "
                "`lmmsqueeze sweep` first"
            )
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            self._check_semantics()
        except sqlite3.DatabaseError as exc:
            raise LmmsqueezeError(f"{str(self.path)!r} is not a lmmsqueeze results file: {exc}") from None

    def _check_semantics(self) -> None:
        """Refuse a store whose rows were measured with other method behaviour: the same pipeline string
        would name different computations (a store without the mark predates it: semantics 1)."""
        found = self.db.execute("SELECT value FROM meta WHERE key='semantics'").fetchone()
        has_rows = self.db.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None
        stored = int(found[0]) if found else (1 if has_rows else SEMANTICS)
        if stored != SEMANTICS:
            self.db.close()
            raise LmmsqueezeError(
                f"{str(self.path)!r} holds results of an earlier lmmsqueeze whose methods compute "
                f"differently (semantics {stored}, now {SEMANTICS}); give a new --results file or move "
                "this one away"
            )
        if not found:
            try:
                with self.db:
                    self.db.execute("INSERT INTO meta (key, value) VALUES ('semantics', ?)",
                                    (str(SEMANTICS),))
            except sqlite3.OperationalError:  # a read-only store: readable as it is
                pass

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def has(self, key: Key) -> bool:
        row = self.db.execute("SELECT 1 FROM runs WHERE " + _KEY_WHERE, _key_args(key)).fetchone()
        return row is not None

    def delete(self, key: Key) -> None:
        """Remove the row with this key (and its answers)."""
        with self.db:
            self.db.execute("DELETE FROM runs WHERE " + _KEY_WHERE, _key_args(key))

    def row(self, key: Key) -> dict[str, Any] | None:
        """The stored row with this key, as :meth:`rows` gives it, or None."""
        found = self.db.execute("SELECT id FROM runs WHERE " + _KEY_WHERE, _key_args(key)).fetchone()
        return None if found is None else next(self._rows("WHERE id=?", [found[0]]))

    def put(self, key: Key, metrics: dict[str, Any], answers: list[dict[str, Any]] | None = None,
            error: str | None = None) -> None:
        """Store one row (replacing an earlier one with the same key) and its answers, atomically."""
        status = "failed" if error else "ok"
        with self.db:  # one transaction
            self.db.execute("DELETE FROM runs WHERE " + _KEY_WHERE, _key_args(key))
            cur = self.db.execute(
                "INSERT INTO runs (model, pipeline, adapter, task, limit_n, seed, status, error, accuracy,"
                " metrics, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (key.model, key.pipeline, key.adapter, key.task, key.limit, key.seed, status, error,
                 metrics.get("accuracy"), json.dumps(metrics), time.time()),
            )
            if answers:
                self.db.executemany(
                    "INSERT INTO answers (run_id, idx, uid, qtype, prediction, answer, score)"
                    " VALUES (?,?,?,?,?,?,?)",
                    [(cur.lastrowid, i, a["uid"], a["qtype"], a["prediction"], a["answer"], a["score"])
                     for i, a in enumerate(answers)],
                )

    def answers(self, key: Key) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT a.uid, a.qtype, a.prediction, a.answer, a.score FROM answers a WHERE a.run_id = "
            "(SELECT id FROM runs WHERE " + _KEY_WHERE + ") ORDER BY a.idx", _key_args(key),
        ).fetchall()
        return [dict(zip(("uid", "qtype", "prediction", "answer", "score"), r, strict=True)) for r in rows]

    def rows(self, task: str | None = None, model: str | None = None) -> Iterator[dict[str, Any]]:
        """Every stored row as a flat dict (identity, status, error and metrics)."""
        clauses, args = [], []
        if task:
            clauses.append("task=?")
            args.append(task)
        if model:
            clauses.append("model=?")
            args.append(model)
        return self._rows(" WHERE " + " AND ".join(clauses) if clauses else "", args)

    def _rows(self, where: str, args: list[Any]) -> Iterator[dict[str, Any]]:
        query = "SELECT model, pipeline, adapter, task, limit_n, seed, status, error, metrics FROM runs "
        for model_, pipeline, adapter, task_, limit_n, seed, status, error, metrics in self.db.execute(
                query + where + " ORDER BY id", args):
            yield {"model": model_, "pipeline": pipeline, "adapter": adapter, "task": task_, "limit": limit_n,
                   "seed": seed, "status": status, "error": error, **json.loads(metrics)}
