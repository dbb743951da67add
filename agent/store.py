"""The local store: one SQLite database in the agent's data directory (runs, params, tags, metric points,
sink cursors). The embedded default backend, and what `flightlog runs` reads."""
from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flightlog.proto.errors import FlightlogError
from flightlog.proto.events import (
    Artifact,
    CheckpointSaved,
    Event,
    HyperParams,
    Metrics,
    RunEnd,
    RunStart,
    SystemStats,
    Tags,
    Text,
)

__all__ = ["Store", "SCHEMA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT, status TEXT, created_at REAL,
    ended_at REAL, error TEXT, config TEXT, config_hash TEXT, host TEXT, pid INTEGER, rank INTEGER,
    tags TEXT, sinks TEXT, metadata TEXT, dropped INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS params (run_id TEXT, key TEXT, value TEXT, PRIMARY KEY (run_id, key));
CREATE TABLE IF NOT EXISTS tags (run_id TEXT, key TEXT, value TEXT, PRIMARY KEY (run_id, key));
CREATE TABLE IF NOT EXISTS metrics (run_id TEXT, key TEXT, step INTEGER, ts REAL, value REAL);
CREATE INDEX IF NOT EXISTS metrics_run_key_step ON metrics (run_id, key, step);
CREATE TABLE IF NOT EXISTS texts (run_id TEXT, key TEXT, step INTEGER, ts REAL, text TEXT);
CREATE TABLE IF NOT EXISTS checkpoints_seen (run_id TEXT, path TEXT, epoch INTEGER, step INTEGER, ts REAL,
    metrics TEXT, size INTEGER, checksum TEXT, is_best INTEGER);
CREATE TABLE IF NOT EXISTS artifacts (run_id TEXT, name TEXT, path TEXT, ts REAL, kind TEXT, checksum TEXT,
    size INTEGER);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, segment INTEGER, offset INTEGER, seq INTEGER,
    updated REAL);
CREATE TABLE IF NOT EXISTS sink_runs (sink TEXT, run_id TEXT, PRIMARY KEY (sink, run_id));
"""


def _finite_or_none(v: float) -> float | None:
    # SQLite stores NaN as NULL; keep that explicit so export can say "NaN".
    return None if v != v else v


class Store:
    """A connection to the local store. One per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                if not self.path.exists():
                    raise FlightlogError(
                        f"no flightlog store at {self.path}; is FLIGHTLOG_DATA_DIR (or --data-dir) right?"
                    )
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                # Sinks run on anyio worker threads, one call at a time: sharing across threads is safe here.
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FlightlogError(f"cannot open the flightlog store {self.path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on any error a rollback (itself allowed to fail: disk full)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    # --- writing -------------------------------------------------------------------------------

    def apply(self, events: Iterable[Event]) -> int:
        """Write events (inside the caller's transaction). Returns the number of metric points written."""
        points: list[tuple[str, str, int, float, float | None]] = []
        db = self.db
        for ev in events:
            t = type(ev)
            if t is Metrics:
                run, step, ts = ev.run_id, ev.step, ev.timestamp
                points.extend((run, k, step, ts, _finite_or_none(v)) for k, v in ev.values.items())
            elif t is SystemStats:
                points.extend((ev.run_id, k, ev.step, ev.timestamp, _finite_or_none(v)) for k, v in ev.values.items())
            elif t is RunStart:
                db.execute(
                    "INSERT INTO runs (run_id, name, description, status, created_at, config, config_hash, host,"
                    " pid, rank, tags, sinks, metadata) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(run_id) DO NOTHING",
                    (ev.run_id, ev.name, ev.description, "running", ev.timestamp, json.dumps(ev.config),
                     ev.config_hash, ev.host, ev.pid, ev.rank, json.dumps(ev.tags), json.dumps(ev.sinks),
                     json.dumps(ev.metadata)),
                )
            elif t is RunEnd:
                db.execute(
                    "UPDATE runs SET status=?, ended_at=?, error=?, dropped=? WHERE run_id=?",
                    (ev.status, ev.timestamp, ev.error, ev.dropped, ev.run_id),
                )
            elif t is HyperParams:
                db.executemany(
                    "INSERT OR REPLACE INTO params VALUES (?,?,?)",
                    [(ev.run_id, k, json.dumps(v)) for k, v in ev.params.items()],
                )
            elif t is Tags:
                db.executemany(
                    "INSERT OR REPLACE INTO tags VALUES (?,?,?)", [(ev.run_id, k, v) for k, v in ev.tags.items()]
                )
            elif t is Text:
                db.execute("INSERT INTO texts VALUES (?,?,?,?,?)", (ev.run_id, ev.key, ev.step, ev.timestamp, ev.text))
            elif t is CheckpointSaved:
                db.execute(
                    "INSERT INTO checkpoints_seen VALUES (?,?,?,?,?,?,?,?,?)",
                    (ev.run_id, ev.path, ev.epoch, ev.step, ev.timestamp, json.dumps(ev.metrics), ev.size,
                     ev.checksum, int(ev.is_best)),
                )
            elif t is Artifact and ev.kind != "checkpoint":  # checkpoints: the registry has them; this is an upload
                db.execute(
                    "INSERT INTO artifacts VALUES (?,?,?,?,?,?,?)",
                    (ev.run_id, ev.name, ev.path, ev.timestamp, ev.kind, ev.checksum, ev.size),
                )
        if points:
            db.executemany("INSERT INTO metrics VALUES (?,?,?,?,?)", points)
        return len(points)

    def save_cursor(self, sink: str, segment: int, offset: int, seq: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO cursors VALUES (?,?,?,?,?)", (sink, segment, offset, seq, time.time())
        )

    def load_cursor(self, sink: str) -> tuple[int, int, int] | None:
        row = self.db.execute("SELECT segment, offset, seq FROM cursors WHERE sink=?", (sink,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def add_sink_runs(self, sink: str, run_ids: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO sink_runs VALUES (?,?)", [(sink, r) for r in run_ids])

    def sink_runs(self, sink: str) -> set[str]:
        return {r for (r,) in self.db.execute("SELECT run_id FROM sink_runs WHERE sink=?", (sink,))}

    # --- reading -------------------------------------------------------------------------------

    def runs(self) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT r.run_id, r.name, r.status, r.created_at, r.ended_at, r.config_hash,"
            " (SELECT COUNT(*) FROM metrics m WHERE m.run_id = r.run_id) FROM runs r ORDER BY r.created_at"
        )
        keys = ("run_id", "name", "status", "created_at", "ended_at", "config_hash", "points")
        return [dict(zip(keys, row)) for row in cur]

    def resolve_run(self, ref: str) -> str:
        """A run id, a unique id prefix, or a run name (the newest run of that name)."""
        row = self.db.execute("SELECT run_id FROM runs WHERE run_id=?", (ref,)).fetchone()
        if row:
            return str(row[0])
        rows = self.db.execute("SELECT run_id FROM runs WHERE run_id LIKE ?", (ref + "%",)).fetchall()
        if len(rows) == 1:
            return str(rows[0][0])
        row = self.db.execute(
            "SELECT run_id FROM runs WHERE name=? ORDER BY created_at DESC LIMIT 1", (ref,)
        ).fetchone()
        if row:
            return str(row[0])
        if len(rows) > 1:
            raise FlightlogError(f"run prefix {ref!r} is ambiguous ({len(rows)} runs); give more characters")
        raise FlightlogError(f"no run {ref!r} in {self.path}; `flightlog runs ls` lists the runs")

    def run(self, run_id: str) -> dict[str, Any]:
        cur = self.db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,))
        row = cur.fetchone()
        if row is None:
            raise FlightlogError(f"no run {run_id!r} in {self.path}")
        out = dict(zip([d[0] for d in cur.description], row))
        out["params"] = {k: json.loads(v) for k, v in self.db.execute(
            "SELECT key, value FROM params WHERE run_id=?", (run_id,))}
        out["tags_kv"] = dict(self.db.execute("SELECT key, value FROM tags WHERE run_id=?", (run_id,)))
        return out

    def metric_points(self, run_id: str, key: str | None = None) -> Iterator[dict[str, Any]]:
        sql = "SELECT key, step, ts, value FROM metrics WHERE run_id=?"
        args: tuple[Any, ...] = (run_id,)
        if key is not None:
            sql += " AND key=?"
            args += (key,)
        for k, step, ts, value in self.db.execute(sql + " ORDER BY key, step, ts", args):
            yield {"run": run_id, "key": k, "step": step, "timestamp": ts, "value": _json_number(value)}

    # --- delivery engine: quarantine (owned by agent/runner.py + agent/engine.py; keep this section last) ---

    _QUARANTINE_SCHEMA = (
        "CREATE TABLE IF NOT EXISTS quarantine (sink TEXT NOT NULL, run_id TEXT NOT NULL, scope TEXT NOT NULL,"
        " seq INTEGER, events INTEGER, reason TEXT, location TEXT, ts REAL)",
        "CREATE INDEX IF NOT EXISTS quarantine_sink_run ON quarantine (sink, run_id)",
    )

    def _quarantine_table(self) -> None:
        # Statement by statement: executescript would COMMIT a transaction the caller has open.
        if not getattr(self, "_quarantine_ready", False):
            for sql in self._QUARANTINE_SCHEMA:
                self.db.execute(sql)
            self._quarantine_ready = True

    def add_quarantine(self, sink: str, run_id: str, scope: str, seq: int, events: int, reason: str,
                       location: str) -> None:
        """One quarantined event (scope "event") or run (scope "run", from ``seq`` on) of a sink."""
        self._quarantine_table()
        self.db.execute("INSERT INTO quarantine VALUES (?,?,?,?,?,?,?,?)",
                        (sink, run_id, scope, seq, events, reason, location, time.time()))

    def more_quarantined(self, sink: str, run_id: str, events: int) -> None:
        """Later events of a run quarantined before went the same way."""
        self._quarantine_table()
        self.db.execute("UPDATE quarantine SET events = events + ? WHERE rowid = (SELECT MAX(rowid) FROM"
                        " quarantine WHERE sink=? AND run_id=? AND scope='run')", (events, sink, run_id))

    def quarantined_runs(self, sink: str) -> set[str]:
        self._quarantine_table()
        return {r for (r,) in self.db.execute(
            "SELECT DISTINCT run_id FROM quarantine WHERE sink=? AND scope='run'", (sink,))}

    def quarantine_rows(self) -> list[dict[str, Any]]:
        """Every quarantine record, oldest first ([] for a store that never had one, even read-only)."""
        keys = ("sink", "run_id", "scope", "seq", "events", "reason", "location", "ts")
        try:
            cur = self.db.execute(f"SELECT {', '.join(keys)} FROM quarantine ORDER BY rowid")
        except sqlite3.OperationalError:  # no such table: nothing was ever quarantined
            return []
        return [dict(zip(keys, row)) for row in cur]


def _json_number(value: float | None) -> float | str:
    """JSON has no NaN/Infinity: export them as strings, the way MLflow's REST API does."""
    if value is None:
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value
