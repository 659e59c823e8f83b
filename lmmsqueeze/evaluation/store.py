"""The results store: one SQLite file (WAL), one row per (model, pipeline, adapter, task, limit, seed).

Every row is written in one transaction together with its per-sample answers, so a process killed
at any moment leaves either the whole row or nothing, and the same sweep run again skips what is
already there. A failed run never replaces a successful row. Answers are kept so loyalty and
re-scoring need no rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import urllib.parse
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


def _check_writable(path: Path) -> None:
    """Refuse, before anything runs, a results file that cannot be written."""
    if path.is_dir():
        raise LmmsqueezeError(f"results file {str(path)!r} is a folder; give a file path to --results")
    folder = path.parent
    if not folder.is_dir():
        raise LmmsqueezeError(f"cannot write results file {str(path)!r}: the folder {str(folder)!r} does not "
                              "exist; create it or give another --results file")
    if path.exists() and not os.access(path, os.W_OK):
        raise LmmsqueezeError(f"results file {str(path)!r} is read-only; give a writable --results file "
                              "(`lmmsqueeze pareto` can still read this one)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LmmsqueezeError(f"cannot write results file {str(path)!r}: the folder {str(folder)!r} is not "
                              "writable; give another --results file")


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), timeout=30)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open for reading only. A store the user may write is opened as usual but refuses every write
    (``query_only``), so closing it tidies SQLite's -wal/-shm files as a writer would; one in a file or
    folder the user may not write is opened read-only, or as immutable where SQLite cannot lock it."""
    if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK):
        db = _connect(path)
        db.execute("PRAGMA query_only=ON")
        return db
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        db.close()
        db = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=30)
    return db


class ResultStore:
    """Read and write results; use as a context manager or call :meth:`close`.

    ``readonly`` opens an existing store for reading only (``pareto``): a store the user may not write
    to stays readable, and reading never changes the file. Every SQLite failure (a damaged page, a
    locked or full disk) becomes a one-line :class:`LmmsqueezeError` naming the file and the fix.
    """

    def __init__(self, path: str | Path = DEFAULT_PATH, create: bool = True, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if (readonly or not create) and not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "does not exist"
            raise LmmsqueezeError(
                f"results file {str(self.path)!r} {what}; run `lmmsqueeze eval` or `lmmsqueeze sweep` first"
            )
        if not readonly:
            _check_writable(self.path)
        try:
            self.db = _connect(self.path) if not readonly else _connect_readonly(self.path)
        except sqlite3.DatabaseError as exc:
            raise LmmsqueezeError(f"{str(self.path)!r} is not a lmmsqueeze results file: {exc}") from None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise self._damaged(exc) from None
        except LmmsqueezeError:
            self.db.close()
            raise

    def _open(self) -> None:
        if self.db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("database disk image is malformed")
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "runs" not in tables or self.readonly and not tables:
            raise LmmsqueezeError(f"{str(self.path)!r} is not a lmmsqueeze results file (an SQLite file "
                                  "without its `runs` table); give another --results file")
        if not self.readonly:  # a new (or empty) file becomes a store; an older store gets what it lacks
            self.db.executescript(_SCHEMA)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
        self._check_semantics("meta" in tables or not self.readonly)

    def _damaged(self, exc: Exception) -> LmmsqueezeError:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "file is not a database" in first:
            return LmmsqueezeError(f"{str(self.path)!r} is not a lmmsqueeze results file: {first}")
        return LmmsqueezeError(
            f"results file {str(self.path)!r} cannot be used ({first}); if it is damaged, move it away "
            "(sqlite3's .recover can save its rows) and give a new --results file"
        )

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite failures during a read or write, as one-line errors."""
        try:
            yield
        except (sqlite3.DatabaseError, ValueError) as exc:  # ValueError: a damaged metrics text
            raise self._damaged(exc) from None

    def _check_semantics(self, has_meta: bool = True) -> None:
        """Refuse a store whose rows were measured with other method behaviour: the same pipeline string
        would name different computations (a store without the mark predates it: semantics 1)."""
        query = "SELECT value FROM meta WHERE key='semantics'"
        found = self.db.execute(query).fetchone() if has_meta else None
        has_rows = self.db.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None
        stored = int(found[0]) if found else (1 if has_rows else SEMANTICS)
        if stored != SEMANTICS:
            self.db.close()
            raise LmmsqueezeError(
                f"{str(self.path)!r} holds results of an earlier lmmsqueeze whose methods compute "
                f"differently (semantics {stored}, now {SEMANTICS}); give a new --results file or move "
                "this one away"
            )
        if not found and not self.readonly:
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

    def status(self, key: Key) -> str | None:
        """``"ok"`` or ``"failed"`` for a stored row, None when nothing is stored under this key."""
        with self._guard():
            row = self.db.execute("SELECT status FROM runs WHERE " + _KEY_WHERE, _key_args(key)).fetchone()
        return None if row is None else row[0]

    def has(self, key: Key) -> bool:
        return self.status(key) is not None

    def delete(self, key: Key) -> None:
        """Remove the row with this key (and its answers)."""
        with self._guard(), self.db:
            self.db.execute("DELETE FROM runs WHERE " + _KEY_WHERE, _key_args(key))

    def row(self, key: Key) -> dict[str, Any] | None:
        """The stored row with this key, as :meth:`rows` gives it, or None."""
        with self._guard():
            found = self.db.execute("SELECT id FROM runs WHERE " + _KEY_WHERE, _key_args(key)).fetchone()
        return None if found is None else self._rows("WHERE id=?", [found[0]])[0]

    def put(self, key: Key, metrics: dict[str, Any], answers: list[dict[str, Any]] | None = None,
            error: str | None = None) -> bool:
        """Store one row and its answers atomically, replacing an earlier row with the same key unless
        that would lose results: a failed run never replaces a successful row (returns False then, and
        nothing is written); a successful run replaces any row, a failed one replaces a failed row."""
        status = "failed" if error else "ok"
        with self._guard(), self.db:  # one transaction, which holds the write lock from the first read
            self.db.execute("BEGIN IMMEDIATE")
            if error and self.status(key) == "ok":
                return False
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
        return True

    def answers(self, key: Key) -> list[dict[str, Any]]:
        with self._guard():
            rows = self.db.execute(
                "SELECT a.uid, a.qtype, a.prediction, a.answer, a.score FROM answers a WHERE a.run_id = "
                "(SELECT id FROM runs WHERE " + _KEY_WHERE + ") ORDER BY a.idx", _key_args(key),
            ).fetchall()
        return [dict(zip(("uid", "qtype", "prediction", "answer", "score"), r, strict=True)) for r in rows]

    def records(self) -> Iterator[tuple[Key, str, str | None, dict[str, Any], list[dict[str, Any]]]]:
        """Every stored row as :meth:`put` takes it: (key, status, error, metrics, answers), in store order
        (what ``lmmsqueeze results merge`` copies)."""
        with self._guard():
            keys = [Key(*r) for r in self.db.execute(
                "SELECT model, pipeline, adapter, task, limit_n, seed FROM runs ORDER BY id").fetchall()]
        for key in keys:
            found = self.record(key)
            if found is not None:
                yield (key, *found)

    def record(self, key: Key) -> tuple[str, str | None, dict[str, Any], list[dict[str, Any]]] | None:
        """The row with this key as :meth:`put` took it: (status, error, metrics, answers), or None."""
        with self._guard():
            found = self.db.execute("SELECT status, error, metrics FROM runs WHERE " + _KEY_WHERE,
                                    _key_args(key)).fetchone()
            if found is None:
                return None
            return found[0], found[1], json.loads(found[2]), self.answers(key)

    def rows(self, task: str | None = None, model: str | None = None) -> Iterator[dict[str, Any]]:
        """Every stored row as a flat dict (identity, status, error and metrics)."""
        clauses, args = [], []
        if task:
            clauses.append("task=?")
            args.append(task)
        if model:
            clauses.append("model=?")
            args.append(model)
        return iter(self._rows(" WHERE " + " AND ".join(clauses) if clauses else "", args))

    def _rows(self, where: str, args: list[Any]) -> list[dict[str, Any]]:
        query = "SELECT model, pipeline, adapter, task, limit_n, seed, status, error, metrics FROM runs "
        out = []
        with self._guard():
            for model_, pipeline, adapter, task_, limit_n, seed, status, error, metrics in self.db.execute(
                    query + where + " ORDER BY id", args):
                out.append({"model": model_, "pipeline": pipeline, "adapter": adapter, "task": task_,
                            "limit": limit_n, "seed": seed, "status": status, "error": error,
                            **json.loads(metrics)})
        return out
