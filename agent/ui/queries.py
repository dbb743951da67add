"""The web UI's own SQL on the local store: the runs table (one query for 10,000 runs, no metric rows read),
a run's artifacts, and the UI's edits (tags, notes, deleting a run). It goes through a ``Store``'s connection,
under its lock (a read) or its transaction (an edit); the metric points are read only through the Store's API (``flightlog.agent.ui.data``)."""
from __future__ import annotations

import json
import sqlite3
from typing import Any, NamedTuple

import msgspec

from flightlog.agent.store import Store
from flightlog.proto.errors import FlightlogError

__all__ = ["RunRow", "runs_table", "tag_list", "artifacts", "set_tags", "set_notes", "delete_run", "KEEP_TABLES"]

#: Tables a run's deletion leaves alone: the checkpoint registry keeps managing the files on disk (its
#: retention and ``flightlog ckpt``), and the sink cursors are not a run's.
KEEP_TABLES = frozenset({"checkpoints", "cursors"})

_decode = msgspec.json.Decoder().decode  # a tenth of json.loads's time on 10,000 runs' tag lists


class RunRow(NamedTuple):
    """One row of the runs table."""

    run_id: str
    name: str
    status: str
    created_at: float
    ended_at: float | None
    config_hash: str
    host: str
    tags: tuple[str, ...]  # the run's tags, then "key=value" of its key-value tags
    notes: str


def tag_list(text: Any) -> list[str]:
    """The run's tag list (the JSON column RunStart filled); [] for NULL or anything but a list."""
    if not text or text == "[]":  # most runs: no JSON to decode
        return []
    try:
        out = _decode(text)
    except (msgspec.DecodeError, TypeError, RecursionError):
        return []
    return [str(t) for t in out] if isinstance(out, list) else []


def runs_table(store: Store) -> list[RunRow]:
    """Every run, newest first: two queries whatever the number of runs (no per-run query, no metric rows)."""
    with store.reading() as db:
        rows = db.execute(
            "SELECT run_id, name, COALESCE(status, ''), COALESCE(created_at, 0), ended_at,"
            " COALESCE(config_hash, ''), COALESCE(host, ''), tags, COALESCE(description, '')"
            " FROM runs ORDER BY created_at DESC").fetchall()
        kv: dict[str, list[str]] = {}
        for run_id, key, value in db.execute("SELECT run_id, key, value FROM tags ORDER BY key"):
            kv.setdefault(run_id, []).append(f"{key}={value}")
    return [RunRow(str(r[0]), str(r[1]), str(r[2]), float(r[3]), r[4], str(r[5]), str(r[6]),
                   (*tag_list(r[7]), *kv.get(r[0], ())), str(r[8])) for r in rows]


def artifacts(store: Store, run_id: str) -> list[dict[str, Any]]:
    """A run's artifacts (name, path, kind, size, checksum, ts), oldest first."""
    keys = ("name", "path", "kind", "size", "checksum", "ts")
    with store.reading() as db:
        cur = db.execute(f"SELECT {', '.join(keys)} FROM artifacts WHERE run_id=? ORDER BY ts", (run_id,))
        return [dict(zip(keys, row)) for row in cur]


def _writable(store: Store) -> None:
    if store.readonly:
        raise FlightlogError(f"the store {store.path} is open read-only; the UI edits through a writable one")


def _known(store: Store, run_id: str) -> str:
    row = store.db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
    if row is None:
        raise FlightlogError(f"no run {run_id!r} in {store.path}; reload the runs table")
    return str(row[0] or "")


def set_tags(store: Store, run_id: str, tags: list[str]) -> None:
    """Replace a run's tags: plain tags in the run's tag list, ``key=value`` ones as key-value tags."""
    _writable(store)
    plain = [t for t in tags if "=" not in t]
    kv = dict(t.split("=", 1) for t in tags if "=" in t)
    with store.transaction():
        _known(store, run_id)
        store.db.execute("UPDATE runs SET tags=? WHERE run_id=?", (json.dumps(plain), run_id))
        store.db.execute("DELETE FROM tags WHERE run_id=?", (run_id,))
        store.db.executemany("INSERT INTO tags VALUES (?,?,?)", [(run_id, k, v) for k, v in kv.items()])


def set_notes(store: Store, run_id: str, notes: str) -> None:
    """A run's notes: its description (what the run started with, until edited here)."""
    _writable(store)
    with store.transaction():
        _known(store, run_id)
        store.db.execute("UPDATE runs SET description=? WHERE run_id=?", (notes, run_id))


def _run_tables(db: sqlite3.Connection) -> list[str]:
    names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    return [n for n in names if n not in KEEP_TABLES
            and any(col[1] == "run_id" for col in db.execute(f'PRAGMA table_info("{n}")'))]


def delete_run(store: Store, run_id: str) -> dict[str, int]:
    """Delete an ended run's rows from every table of the store that has a ``run_id`` column (whatever the
    layout of the metric points), in one transaction; returns rows deleted per table. A running run is
    refused: its producer would write it again, in part. The WAL and the files on disk are left as they are."""
    _writable(store)
    deleted: dict[str, int] = {}
    with store.transaction():
        if _known(store, run_id) == "running":
            raise FlightlogError(f"run {run_id} is still running; stop it (or wait for its end) before deleting it")
        for table in _run_tables(store.db):
            n = store.db.execute(f'DELETE FROM "{table}" WHERE run_id=?', (run_id,)).rowcount
            if n:
                deleted[table] = n
    return deleted
