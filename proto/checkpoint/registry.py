"""The checkpoint registry: one SQLite table, in the agent's store (``flightlog.db``) or, for a
standalone ModelCheckpointer, in ``registry.db`` inside the checkpoint directory.

Rows are keyed by the final path and scoped by directory: retention, "best" and "latest" are per
directory, so a resumed run (a new run id) finds the checkpoints of the one before it.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from flightlog.proto.errors import CheckpointError
from flightlog.proto.osutil import make_dirs
from flightlog.proto.sqlite import connect, transaction

from .retention import Entry, choose_best, plan_retention

__all__ = ["Registry", "SCHEMA", "STANDALONE_NAME"]

STANDALONE_NAME = "registry.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY, dir TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
    request_id TEXT, run_id TEXT, epoch INTEGER, step INTEGER, metrics TEXT, size INTEGER, checksum TEXT,
    compression TEXT, level INTEGER, dtypes TEXT, nbytes INTEGER, tensors INTEGER, config_hash TEXT,
    git_commit TEXT, created REAL, saved REAL, is_best INTEGER DEFAULT 0, writer_pid INTEGER, tmp_path TEXT,
    error TEXT);
CREATE INDEX IF NOT EXISTS checkpoints_dir_state_seq ON checkpoints (dir, state, seq);
"""

_JSON_COLUMNS = ("metrics", "dtypes")


class Registry:
    """A connection for one checkpoint's write (``begin`` … ``commit``) or one look-up: checkpoints come
    seconds to hours apart, so the writer opens it per checkpoint, on the thread that writes; it is
    never shared between threads."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                self.db = connect(self.path, readonly=True)
            else:
                make_dirs(self.path.parent)  # 0700; an existing directory keeps its mode
                self.db = connect(self.path)
                self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open the checkpoint registry {self.path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        try:
            cur = self.db.execute(sql, args)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # a read-only look at a store that never saw a checkpoint
            raise CheckpointError(f"checkpoint registry {self.path}: {exc}") from exc
        names = [d[0] for d in cur.description]
        out = []
        for row in cur:
            d = dict(zip(names, row))
            for col in _JSON_COLUMNS:
                d[col] = json.loads(d[col]) if d.get(col) else {}
            d["is_best"] = bool(d["is_best"])
            out.append(d)
        return out

    # --- writing -------------------------------------------------------------------------------

    def begin(self, spec: dict[str, Any], tmp_path: str) -> None:
        """Record a checkpoint as being written (retention never touches it in this state)."""
        path = spec["path"]
        with transaction(self.db) as db:
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM checkpoints").fetchone()
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (path, dir, seq, state, request_id, run_id, epoch, step, metrics,"
                " compression, level, dtypes, nbytes, tensors, config_hash, git_commit, created, writer_pid,"
                " tmp_path) VALUES (?,?,?,'writing',?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (path, str(Path(path).parent), seq, spec.get("request_id", ""), spec.get("run_id", ""),
                 spec["epoch"], spec["step"], json.dumps(spec.get("metrics", {})), spec["codec"], spec["level"],
                 json.dumps(spec.get("dtypes", {})), spec.get("data_bytes", 0), len(spec.get("tensors", [])),
                 spec.get("config_hash", ""), spec.get("git_commit", ""), spec.get("created", time.time()),
                 os.getpid(), tmp_path),
            )

    def commit(self, spec: dict[str, Any], size: int, checksum: str) -> tuple[dict[str, Any], list[str]]:
        """Mark the checkpoint durable, move the best pointer, and plan retention; returns the row and
        the paths the caller must now delete (already marked deleted here)."""
        path, directory = spec["path"], str(Path(spec["path"]).parent)
        ret = spec.get("retention", {})
        with transaction(self.db) as db:
            cur = self._rows("SELECT * FROM checkpoints WHERE dir=? AND state='done' AND is_best=1", (directory,))
            current = _entry(cur[0]) if cur else None
            new = Entry(path, 0, spec["step"], spec.get("metrics", {}))
            best = choose_best(current, new, is_best=spec.get("is_best"), monitor=ret.get("monitor"),
                               mode=ret.get("mode", "min"))
            if best:
                db.execute("UPDATE checkpoints SET is_best=0 WHERE dir=? AND is_best=1", (directory,))
            db.execute(
                "UPDATE checkpoints SET state='done', size=?, checksum=?, saved=?, is_best=?, tmp_path=NULL"
                " WHERE path=?", (size, checksum, time.time(), int(best), path),
            )
            done = self._rows("SELECT * FROM checkpoints WHERE dir=? AND state='done'", (directory,))
            writing = [r["path"] for r in self._rows(
                "SELECT * FROM checkpoints WHERE dir=? AND state='writing'", (directory,))]
            best_path = next((r["path"] for r in done if r["is_best"]), None)
            doomed = plan_retention([_entry(r) for r in done], best=best_path, protected=writing,
                                    max_keep=int(ret.get("max_checkpoints", 0)),
                                    keep_every_n_steps=int(ret.get("keep_every_n_steps", 0)))
            db.executemany("UPDATE checkpoints SET state='deleted', is_best=0 WHERE path=?", [(p,) for p in doomed])
        row = self.get(path)
        assert row is not None
        return row, doomed

    def fail(self, path: str, error: str) -> None:
        self.db.execute("UPDATE checkpoints SET state='failed', error=?, tmp_path=NULL WHERE path=? AND state='writing'",
                        (error, path))

    def mark_interrupted(self, path: str) -> None:
        self.fail(path, "interrupted: the writer died before the file was durable")

    # --- reading -------------------------------------------------------------------------------

    def get(self, path: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM checkpoints WHERE path=?", (str(path),))
        return rows[0] if rows else None

    def entries(self, directory: str | None = None, states: tuple[str, ...] = ("done",)) -> list[dict[str, Any]]:
        """Rows oldest first (by save order), for one directory or all."""
        marks = ",".join("?" * len(states))
        if directory is None:
            return self._rows(f"SELECT * FROM checkpoints WHERE state IN ({marks}) ORDER BY seq", states)
        return self._rows(f"SELECT * FROM checkpoints WHERE dir=? AND state IN ({marks}) ORDER BY seq",
                          (str(directory), *states))

    def best(self, directory: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM checkpoints WHERE dir=? AND state='done' AND is_best=1", (str(directory),))
        return rows[0] if rows else None

    def latest(self, directory: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM checkpoints WHERE dir=? AND state='done' ORDER BY seq DESC LIMIT 1",
                          (str(directory),))
        return rows[0] if rows else None


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(row["path"], int(row["seq"]), int(row["step"]), row["metrics"])
