"""The checkpoint registry: one SQLite table, in the agent's store (``flightlog.db``) or, for a
standalone ModelCheckpointer, in ``registry.db`` inside the checkpoint directory.

Rows are keyed by the final path and scoped by (directory, run id): retention, "best" and "latest" are
per run, so two runs sharing a directory never touch each other's files; a run continued under its run
id finds its own. ``run_id`` is the scope's whole identity: a distributed job fills it with the job's run
id, so its ranks share one. Rows from before runs were scoped (run id '' or NULL) stay readable as run ''.
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
CREATE INDEX IF NOT EXISTS checkpoints_dir_run_state_seq ON checkpoints (dir, run_id, state, seq);
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
                _migrate(self.db)
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
        """Record a checkpoint as being written (retention never touches it in this state). Raises
        CheckpointError if the final path belongs to another run: a file already there that this run did
        not register here, or a row another run holds (being written or durable)."""
        path, run_id = spec["path"], spec.get("run_id") or ""
        with transaction(self.db) as db:
            _check_owner(db, self.path, path, run_id)
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM checkpoints").fetchone()
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (path, dir, seq, state, request_id, run_id, epoch, step, metrics,"
                " compression, level, dtypes, nbytes, tensors, config_hash, git_commit, created, writer_pid,"
                " tmp_path) VALUES (?,?,?,'writing',?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (path, str(Path(path).parent), seq, spec.get("request_id", ""), run_id,
                 spec["epoch"], spec["step"], json.dumps(spec.get("metrics", {})), spec["codec"], spec["level"],
                 json.dumps(spec.get("dtypes", {})), spec.get("data_bytes", 0), len(spec.get("tensors", [])),
                 spec.get("config_hash", ""), spec.get("git_commit", ""), spec.get("created", time.time()),
                 os.getpid(), tmp_path),
            )

    def commit(self, spec: dict[str, Any], size: int, checksum: str) -> tuple[dict[str, Any], list[str]]:
        """Mark the checkpoint durable, move its run's best pointer, and plan its run's retention; returns
        the row and the paths the caller must now delete (already marked deleted here). Other runs' rows
        in the directory are never candidates."""
        path, directory = spec["path"], str(Path(spec["path"]).parent)
        scope = (directory, spec.get("run_id") or "")
        ret = spec.get("retention", {})
        with transaction(self.db) as db:
            cur = self._rows(f"SELECT * FROM checkpoints WHERE {_SCOPE} AND state='done' AND is_best=1", scope)
            current = _entry(cur[0]) if cur else None
            new = Entry(path, 0, spec["step"], spec.get("metrics", {}))
            best = choose_best(current, new, is_best=spec.get("is_best"), monitor=ret.get("monitor"),
                               mode=ret.get("mode", "min"))
            if best:
                db.execute(f"UPDATE checkpoints SET is_best=0 WHERE {_SCOPE} AND is_best=1", scope)
            db.execute(
                "UPDATE checkpoints SET state='done', size=?, checksum=?, saved=?, is_best=?, tmp_path=NULL"
                " WHERE path=?", (size, checksum, time.time(), int(best), path),
            )
            done = self._rows(f"SELECT * FROM checkpoints WHERE {_SCOPE} AND state='done'", scope)
            writing = [r["path"] for r in self._rows(
                f"SELECT * FROM checkpoints WHERE {_SCOPE} AND state='writing'", scope)]
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

    def mark_deleted(self, path: str) -> bool:
        """A durable checkpoint deleted by hand (``flightlog ckpt rm``): no longer loadable nor best."""
        cur = self.db.execute("UPDATE checkpoints SET state='deleted', is_best=0 WHERE path=? AND state='done'",
                              (str(path),))
        return cur.rowcount > 0

    def forget(self, path: str) -> None:
        """The file was deleted by someone else's retention (Lightning's ``save_top_k``): never best or latest."""
        with transaction(self.db) as db:
            db.execute("UPDATE checkpoints SET state='deleted', is_best=0 WHERE path=?", (str(path),))

    def mark_interrupted(self, path: str) -> None:
        self.fail(path, "interrupted: the writer died before the file was durable")

    # --- reading -------------------------------------------------------------------------------

    def get(self, path: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM checkpoints WHERE path=?", (str(path),))
        return rows[0] if rows else None

    def entries(self, directory: str | None = None, states: tuple[str, ...] = ("done",), *,
                run_id: str | None = None) -> list[dict[str, Any]]:
        """Rows oldest first (by save order), for one directory or all, one run (``run_id``) or all."""
        marks = ",".join("?" * len(states))
        where, args = [f"state IN ({marks})"], list(states)
        if directory is not None:
            where.append("dir=?")
            args.append(str(directory))
        if run_id is not None:
            where.append("run_id=?")
            args.append(run_id)
        return self._rows(f"SELECT * FROM checkpoints WHERE {' AND '.join(where)} ORDER BY seq", tuple(args))

    def best(self, directory: str, *, run_id: str) -> dict[str, Any] | None:
        """The run's best durable checkpoint in ``directory``."""
        rows = self._rows(f"SELECT * FROM checkpoints WHERE {_SCOPE} AND state='done' AND is_best=1",
                          (str(directory), run_id))
        return rows[0] if rows else None

    def latest(self, directory: str, *, run_id: str) -> dict[str, Any] | None:
        """The run's newest durable checkpoint in ``directory``."""
        rows = self._rows(f"SELECT * FROM checkpoints WHERE {_SCOPE} AND state='done' ORDER BY seq DESC LIMIT 1",
                          (str(directory), run_id))
        return rows[0] if rows else None

    def runs(self, directory: str) -> list[str]:
        """Run ids with durable checkpoints in ``directory``, the most recently saved first."""
        try:
            cur = self.db.execute("SELECT run_id FROM checkpoints WHERE dir=? AND state='done' GROUP BY run_id"
                                  " ORDER BY MAX(seq) DESC", (str(directory),))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise CheckpointError(f"checkpoint registry {self.path}: {exc}") from exc
        return [r[0] for r in cur]


#: The rows of one run in one directory: (dir, run_id).
_SCOPE = "dir=? AND run_id=?"


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a registry from before runs were scoped up to date: its rows without a run id become run ''
    (the index that serves per-run look-ups comes with SCHEMA). Checked first, so that an up-to-date
    registry is not written to (an UPDATE takes the write lock even when it matches nothing)."""
    if db.execute("SELECT 1 FROM checkpoints WHERE run_id IS NULL LIMIT 1").fetchone():
        with transaction(db):
            db.execute("UPDATE checkpoints SET run_id='' WHERE run_id IS NULL")


def _check_owner(db: sqlite3.Connection, registry: Path, path: str, run_id: str) -> None:
    """Refuse a write that would replace a file another run registered, or one nobody registered here."""
    row = db.execute("SELECT run_id, state FROM checkpoints WHERE path=?", (path,)).fetchone()
    owner = None if row is None else row[0] or ""
    if row is not None and owner != run_id and row[1] in ("writing", "done"):
        raise CheckpointError(
            f"refusing to write checkpoint {path} for run {run_id!r}: run {owner!r} registered that path "
            f"({row[1]}) in {registry}, and a write never replaces another run's checkpoint; save under "
            "another name (ModelCheckpointer names its files ckpt-<run id>-e<epoch>-s<step>)")
    if owner != run_id and os.path.lexists(path):
        who = "no run" if row is None else f"run {owner!r}"
        raise CheckpointError(
            f"refusing to write checkpoint {path} for run {run_id!r}: a file is already there that {who} "
            f"registered in {registry}; move it away or save under another name")


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(row["path"], int(row["seq"]), int(row["step"]), row["metrics"])
