"""The local store: all SQL on the agent's database (``flightlog.db`` in its data directory: runs, params,
tags, metric points as compressed columnar chunks (their codec: ``store_chunks.py``), sink cursors). The
embedded default backend, what `flightlog runs` reads, and what the monitor and the plot service read runs
and metrics from. (The checkpoint registry's table lives in the same
file; its SQL is the shared core's, ``flightlog.proto.checkpoint.registry``.)"""
from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, Literal, NamedTuple, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import zstandard

from flightlog.agent import store_chunks as _chunks
from flightlog.agent.store_chunks import Envelope
from flightlog.proto import sqlite as _sqlite
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

__all__ = ["Envelope", "Store", "RunState", "SCHEMA", "RankEnd", "combine_rank_ends"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT, status TEXT, created_at REAL,
    ended_at REAL, error TEXT, config TEXT, config_hash TEXT, host TEXT, pid INTEGER, rank INTEGER,
    tags TEXT, sinks TEXT, metadata TEXT, dropped INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS params (run_id TEXT, key TEXT, value TEXT, PRIMARY KEY (run_id, key));
CREATE TABLE IF NOT EXISTS tags (run_id TEXT, key TEXT, value TEXT, PRIMARY KEY (run_id, key));
CREATE TABLE IF NOT EXISTS texts (run_id TEXT, key TEXT, step INTEGER, ts REAL, text TEXT);
CREATE TABLE IF NOT EXISTS checkpoints_seen (run_id TEXT, path TEXT, epoch INTEGER, step INTEGER, ts REAL,
    metrics TEXT, size INTEGER, checksum TEXT, is_best INTEGER);
CREATE TABLE IF NOT EXISTS artifacts (run_id TEXT, name TEXT, path TEXT, ts REAL, kind TEXT, checksum TEXT,
    size INTEGER);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, segment INTEGER, offset INTEGER, seq INTEGER,
    updated REAL);
CREATE TABLE IF NOT EXISTS sink_runs (sink TEXT, run_id TEXT, PRIMARY KEY (sink, run_id));
CREATE TABLE IF NOT EXISTS quarantine (sink TEXT NOT NULL, run_id TEXT NOT NULL, scope TEXT NOT NULL,
    seq INTEGER, events INTEGER, reason TEXT, location TEXT, ts REAL);
CREATE INDEX IF NOT EXISTS quarantine_sink_run ON quarantine (sink, run_id);
CREATE TABLE IF NOT EXISTS run_ranks (run_id TEXT, rank INTEGER, world_size INTEGER, status TEXT, error TEXT,
    ended_at REAL, dropped INTEGER DEFAULT 0, PRIMARY KEY (run_id, rank));
CREATE TABLE IF NOT EXISTS run_nodes (run_id TEXT PRIMARY KEY, nodes INTEGER, local_world INTEGER);
""" + _chunks.CHUNK_SCHEMA

#: Which rank's end names a distributed run's status, first first: a rank's failure (its traceback) is
#: the cause when the launcher then kills the others.
_END_PRECEDENCE = ("failed", "crashed", "killed")


class RankEnd(NamedTuple):
    status: str
    error: str
    timestamp: float
    dropped: int


def combine_rank_ends(run_id: str, world_size: int, ends: dict[int, RankEnd]) -> RunEnd | None:
    """A distributed run's end once every rank of its world ended (None before): ``failed`` if a rank
    failed, else ``crashed`` if one died without finish(), else ``killed``, else ``completed``; the error
    names each rank that did not complete."""
    if len(ends) < world_size:
        return None
    status = next((s for s in _END_PRECEDENCE if any(e.status == s for e in ends.values())), "completed")
    bad = sorted(r for r, e in ends.items() if e.status != "completed")
    error = "\n".join(f"rank {r} {ends[r].status}" + (f": {ends[r].error}" if ends[r].error else "") for r in bad)
    first = next((r for r in bad if ends[r].status == status), 0)
    return RunEnd(run_id, status, max(e.timestamp for e in ends.values()), error,
                  sum(e.dropped for e in ends.values()), first)


def _locked(method: Callable[Concatenate[Store, _P], _R]) -> Callable[Concatenate[Store, _P], _R]:
    """Run a Store method under the store's lock (one thread at a time on the connection)."""

    def locked(self: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    functools.update_wrapper(locked, method)
    return locked


def _json_object(text: Any) -> dict[str, Any]:
    """A JSON column holding an object; {} for NULL or anything else (a row written by a broken client)."""
    if not text:
        return {}
    try:
        out = json.loads(text)
    except (TypeError, ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return {}
    return out if isinstance(out, dict) else {}


class RunState(NamedTuple):
    """A run as the monitor and the plot service poll it: no JSON decoded (that is once per new run)."""

    run_id: str
    status: str
    created_at: float
    ended_at: float | None
    pid: int
    rank: int
    host: str


class Store:
    """One long-lived connection to the local store.

    In the agent: the store sink's (read-write; its runner's worker threads), the cursor store's for the
    other sinks (read-write; ``runner.CursorStore``), the monitor's and the plot service's (read-only,
    ``readonly=True``; their worker threads), so a slow plot query never holds up a commit (WAL
    journalling: readers and the writer do not block each other). A Store may be
    called from several threads (the plot service asks ``pending`` while a render runs): every call holds
    the store's lock, and a transaction holds it from BEGIN to COMMIT, so no two threads ever use the
    sqlite3 connection at once.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._cctx = zstandard.ZstdCompressor(level=3)  # used under the lock only
        try:
            if readonly:
                if not self.path.exists():
                    raise FlightlogError(
                        f"no flightlog store at {self.path}; is FLIGHTLOG_DATA_DIR (or --data-dir) right?"
                    )
                self.db = _sqlite.connect(self.path, readonly=True)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.db = _sqlite.connect(self.path)
                self.db.executescript(SCHEMA)
                self._migrate_rows()
        except sqlite3.DatabaseError as exc:
            raise FlightlogError(f"cannot open the flightlog store {self.path}: {exc}") from exc

    def _migrate_rows(self) -> None:
        """A store of an older version (a row per metric value; before ranks, without a rank column: rank 0's)
        gets its points moved into chunks, in one transaction: all of them or none (another connection of
        the agent opening it at the same moment finds the work done)."""
        if not _chunks.has_row_table(self.db):
            return
        try:
            with _sqlite.transaction(self.db):
                _chunks.migrate_rows(self.db, self._cctx)
        except (ValueError, TypeError, OverflowError) as exc:
            raise FlightlogError(f"cannot move the metric rows of {self.path} into chunks: {exc}; the store is"
                                 " as it was: copy it aside and start with a new one") from exc

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (``flightlog.proto.sqlite.transaction``: a rollback on any error, itself
        allowed to fail on a full disk without masking the error). Holds the store's lock throughout."""
        with self._lock, _sqlite.transaction(self.db):
            yield

    # --- writing -------------------------------------------------------------------------------

    @_locked
    def apply(self, events: Iterable[Event]) -> int:
        """Write events (inside the caller's transaction). Returns the number of metric points written."""
        evs = events if isinstance(events, list) else list(events)
        points = _chunks.PointBuffer()
        # The Metrics between two other events are taken together, a column at a time (PointBuffer.add_metrics);
        # all Metrics (the common batch) is one pass of C over their types: no per-event dispatch.
        others = [] if set(map(type, evs)) <= {Metrics} else [i for i, ev in enumerate(evs) if type(ev) is not Metrics]
        start = 0
        for i in others:
            points.add_metrics(evs[start:i])  # type: ignore[arg-type]  # what came before it first: arrival order
            self._apply_other(evs[i], points)
            start = i + 1
        points.add_metrics(evs[start:] if start else evs)  # type: ignore[arg-type]
        return _chunks.append_points(self.db, points, self._cctx) if points.series else 0

    def _apply_other(self, ev: Event, points: _chunks.PointBuffer) -> None:
        """One event that is not Metrics."""
        db = self.db
        # isinstance, not a lookup of type(ev): as fast here, and a type checker follows it
        if isinstance(ev, SystemStats):
            points.add(ev.run_id, ev.step, ev.timestamp, ev.values, 0)
        elif isinstance(ev, RunStart):
            self._run_start(ev)
        elif isinstance(ev, RunEnd):
            self._run_end(ev)
        elif isinstance(ev, HyperParams):
            db.executemany(
                "INSERT OR REPLACE INTO params VALUES (?,?,?)",
                [(ev.run_id, k, json.dumps(v)) for k, v in ev.params.items()],
            )
            if ev.config_hash:  # the run's hash covers its logged hyper-parameters
                db.execute("UPDATE runs SET config_hash=? WHERE run_id=?", (ev.config_hash, ev.run_id))
        elif isinstance(ev, Tags):
            db.executemany(
                "INSERT OR REPLACE INTO tags VALUES (?,?,?)", [(ev.run_id, k, v) for k, v in ev.tags.items()]
            )
        elif isinstance(ev, Text):
            db.execute("INSERT INTO texts VALUES (?,?,?,?,?)", (ev.run_id, ev.key, ev.step, ev.timestamp, ev.text))
        elif isinstance(ev, CheckpointSaved):
            db.execute(
                "INSERT INTO checkpoints_seen VALUES (?,?,?,?,?,?,?,?,?)",
                (ev.run_id, ev.path, ev.epoch, ev.step, ev.timestamp, json.dumps(ev.metrics), ev.size,
                 ev.checksum, int(ev.is_best)),
            )
        elif isinstance(ev, Artifact) and ev.kind != "checkpoint":  # a checkpoint: the registry has it
            db.execute(
                "INSERT INTO artifacts VALUES (?,?,?,?,?,?,?)",
                (ev.run_id, ev.name, ev.path, ev.timestamp, ev.kind, ev.checksum, ev.size),
            )

    def _run_start(self, ev: RunStart) -> None:
        """A run's row; rank 0's RunStart describes the run even when another rank's came first (other ranks
        join: their RunStart only adds them to the run's rank table)."""
        conflict = "DO NOTHING" if ev.rank else (
            "DO UPDATE SET name=excluded.name, description=excluded.description, created_at=excluded.created_at,"
            " config=excluded.config, config_hash=excluded.config_hash, host=excluded.host, pid=excluded.pid,"
            " rank=excluded.rank, tags=excluded.tags, sinks=excluded.sinks, metadata=excluded.metadata")
        self.db.execute(
            "INSERT INTO runs (run_id, name, description, status, created_at, config, config_hash, host,"
            " pid, rank, tags, sinks, metadata) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
            f" ON CONFLICT(run_id) {conflict}",
            (ev.run_id, ev.name, ev.description, "running", ev.timestamp, json.dumps(ev.config),
             ev.config_hash, ev.host, ev.pid, ev.rank, json.dumps(ev.tags), json.dumps(ev.sinks),
             json.dumps(ev.metadata)),
        )
        if ev.world_size > 1:
            self.db.execute("INSERT OR IGNORE INTO run_ranks (run_id, rank, world_size, status) VALUES (?,?,?,?)",
                            (ev.run_id, ev.rank, ev.world_size, "running"))
        if ev.nodes > 1:  # this node's agent sees only its own ranks: the run ends here when they did
            self.db.execute("INSERT OR IGNORE INTO run_nodes VALUES (?,?,?)",
                            (ev.run_id, ev.nodes, ev.local_world_size or max(1, ev.world_size // ev.nodes)))

    def _run_end(self, ev: RunEnd) -> None:
        """A run's end; of a distributed run, one rank's end (its first end counts), and the run's own once
        every rank of its world ended (``combine_rank_ends``) — of a multi-node job, every rank of this node."""
        db = self.db
        row = db.execute("SELECT MAX(world_size) FROM run_ranks WHERE run_id=?", (ev.run_id,)).fetchone()
        world = int(row[0] or 0)
        final: RunEnd | None = ev
        if world > 1:
            db.execute(
                "INSERT INTO run_ranks (run_id, rank, world_size, status, error, ended_at, dropped)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT(run_id, rank) DO UPDATE SET status=excluded.status,"
                " error=excluded.error, ended_at=excluded.ended_at, dropped=excluded.dropped"
                " WHERE run_ranks.status='running'",
                (ev.run_id, ev.rank, world, ev.status, ev.error, ev.timestamp, ev.dropped),
            )
            ends = {int(r): RankEnd(st, err or "", float(ts or 0), int(d or 0)) for r, st, err, ts, d in db.execute(
                "SELECT rank, status, error, ended_at, dropped FROM run_ranks WHERE run_id=? AND status!='running'",
                (ev.run_id,))}
            node = db.execute("SELECT local_world FROM run_nodes WHERE run_id=?", (ev.run_id,)).fetchone()
            # A multi-node job: this node's store ends the run once this node's ranks ended (each node's
            # store holds its own ranks; MLflow combines the nodes' ends).
            final = combine_rank_ends(ev.run_id, int(node[0]) if node else world, ends)
        if final is not None:
            db.execute("UPDATE runs SET status=?, ended_at=?, error=?, dropped=? WHERE run_id=?",
                       (final.status, final.timestamp, final.error, final.dropped, final.run_id))

    @_locked
    def rank_table(self, run_id: str) -> list[dict[str, Any]]:
        """The ranks of a distributed run ([] for a run of one process): rank, status, error, ended_at."""
        keys = ("rank", "world_size", "status", "error", "ended_at")
        try:
            cur = self.db.execute(f"SELECT {', '.join(keys)} FROM run_ranks WHERE run_id=? ORDER BY rank", (run_id,))
        except sqlite3.OperationalError:  # a read-only store of an older version: no such table
            return []
        return [dict(zip(keys, row)) for row in cur]

    @_locked
    def save_cursor(self, sink: str, segment: int, offset: int, seq: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO cursors VALUES (?,?,?,?,?)", (sink, segment, offset, seq, time.time())
        )

    @_locked
    def load_cursor(self, sink: str) -> tuple[int, int, int] | None:
        row = self.db.execute("SELECT segment, offset, seq FROM cursors WHERE sink=?", (sink,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    @_locked
    def add_sink_runs(self, sink: str, run_ids: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO sink_runs VALUES (?,?)", [(sink, r) for r in run_ids])

    @_locked
    def sink_runs(self, sink: str) -> set[str]:
        return {r for (r,) in self.db.execute("SELECT run_id FROM sink_runs WHERE sink=?", (sink,))}

    # --- the monitor and the plot service ------------------------------------------------------------

    @_locked
    def run_states(self, status: str | None = None) -> list[RunState]:
        """Every run (or those in ``status``), oldest first: what the monitor and the plot service poll."""
        sql = ("SELECT run_id, status, COALESCE(created_at, 0), ended_at, COALESCE(pid, 0), COALESCE(rank, 0),"
               " COALESCE(host, '') FROM runs")
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status=?"
            args = (status,)
        return [RunState(*row) for row in self.db.execute(sql + " ORDER BY created_at", args)]

    def run_config(self, run_id: str) -> dict[str, Any]:
        """The config a run started with, as the SDK sent it ({} if unknown or unreadable)."""
        return self._json_column("config", run_id)

    def run_metadata(self, run_id: str) -> dict[str, Any]:
        """The metadata a run started with (environment, git, command line; {} if unknown or unreadable)."""
        return self._json_column("metadata", run_id)

    @_locked
    def _json_column(self, column: str, run_id: str) -> dict[str, Any]:
        row = self.db.execute(f"SELECT {column} FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return _json_object(row[0]) if row else {}

    @_locked
    def metric_keys(self, run_id: str) -> list[str]:
        return _chunks.keys(self.db, run_id)

    def metric_series(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric in step order, finite values only (NaN and infinities are not drawn)."""
        steps, _, values = self.metric_arrays(run_id, key)
        finite = np.isfinite(values)
        return list(zip(steps[finite].tolist(), (values[finite] + 0.0).tolist(), strict=True))  # -0.0: 0.0

    @_locked
    def metric_arrays(self, run_id: str, key: str, rank: int | None = None) -> tuple[
            npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(steps, timestamps, values) of one metric as numpy arrays (int64, float64, float64), sorted by step,
        then timestamp, then arrival; every rank's points or ``rank``'s; NaN and infinities included."""
        cols = _chunks.read_columns(self.db, run_id, key, rank=rank).sorted()
        return cols.steps, cols.ts, cols.values

    @_locked
    def metric_envelope(self, run_id: str, key: str, columns: int, x: Literal["step", "time"] = "step",
                        lo: float | None = None, hi: float | None = None, rank: int | None = None) -> Envelope:
        """One metric reduced to ``columns`` pixel columns of the x axis (``step``, or ``time``: unix
        seconds) over [lo, hi] (default: its finite points' range): per column the number of finite points
        and their min, max, first and last (``store_chunks.Envelope``). Only chunks overlapping [lo, hi] are
        decoded."""
        cols = _chunks.read_columns(self.db, run_id, key, rank=rank, x=x, lo=lo, hi=hi)
        return _chunks.envelope(cols, columns, x, lo, hi)

    @_locked
    def metric_count(self, run_id: str | None = None, key: str | None = None) -> int:
        """How many metric points the store holds: of every run, of ``run_id``, of one key of it."""
        return _chunks.count_points(self.db, run_id, key)

    @_locked
    def last_step(self, run_id: str, *, skip_prefix: str = "system/") -> int | None:
        """The highest step of a run's metrics, not counting keys under ``skip_prefix`` (the monitor's
        ``system/`` stats count seconds, not training steps); None if it has none."""
        return _chunks.last_step(self.db, run_id, skip_prefix)

    # --- reading -------------------------------------------------------------------------------

    @_locked
    def runs(self) -> list[dict[str, Any]]:
        points = ("(SELECT COALESCE(SUM(n), 0) FROM metric_chunks m WHERE m.run_id = r.run_id)"
                  if not _chunks.has_row_table(self.db) else
                  "(SELECT COUNT(*) FROM metrics m WHERE m.run_id = r.run_id)")  # read-only, of an older version
        cur = self.db.execute(
            "SELECT r.run_id, r.name, r.status, r.created_at, r.ended_at, r.config_hash,"
            f" {points} FROM runs r ORDER BY r.created_at"
        )
        keys = ("run_id", "name", "status", "created_at", "ended_at", "config_hash", "points")
        return [dict(zip(keys, row)) for row in cur]

    @_locked
    def resolve_run(self, ref: str) -> str:
        """A run id, a unique id prefix, or a run name that only one run has (several: refused, listed)."""
        row = self.db.execute("SELECT run_id FROM runs WHERE run_id=?", (ref,)).fetchone()
        if row:
            return str(row[0])
        rows = self.db.execute("SELECT run_id FROM runs WHERE run_id LIKE ?", (ref + "%",)).fetchall()
        if len(rows) == 1:
            return str(rows[0][0])
        named = self.db.execute(
            "SELECT run_id, status, created_at FROM runs WHERE name=? ORDER BY created_at DESC", (ref,)
        ).fetchall()
        if len(named) == 1:
            return str(named[0][0])
        if named:
            listed = "; ".join(f"{rid} ({status or '?'}, started {_when(created)})" for rid, status, created in named)
            raise FlightlogError(f"{len(named)} runs are named {ref!r}: {listed}; give a run id (or a unique prefix)")
        if len(rows) > 1:
            raise FlightlogError(f"run prefix {ref!r} is ambiguous ({len(rows)} runs); give more characters")
        raise FlightlogError(f"no run {ref!r} in {self.path}; `flightlog runs ls` lists the runs")

    @_locked
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
        """A run's points (of one key, or all) for export, by key, step, timestamp. Read a key at a time, each
        under the lock, so a long export never holds the store for the whole run."""
        with self._lock:
            keys = self.metric_keys(run_id) if key is None else [key]
        for k in keys:
            with self._lock:
                cols = _chunks.read_columns(self.db, run_id, k).sorted()
            # -0.0 + 0.0 is 0.0: what the row store gave back (SQLite keeps an integral REAL as an integer)
            values = (cols.values + 0.0).tolist()
            times: list[float | None] = cols.ts.tolist()
            if np.isnan(cols.ts).any():  # SQLite held a NaN timestamp as NULL: export says null, as it did
                times = [None if t != t else t for t in times]
            for step, ts, value, r in zip(cols.steps.tolist(), times, values, cols.ranks.tolist(), strict=True):
                yield {"run": run_id, "key": k, "step": step, "timestamp": ts, "value": _json_number(value),
                       "rank": r}

    # --- quarantine (written by the delivery engine, agent/runner.py) ---

    @_locked
    def add_quarantine(self, sink: str, run_id: str, scope: str, seq: int, events: int, reason: str,
                       location: str) -> None:
        """One quarantined event (scope "event") or run (scope "run", from ``seq`` on) of a sink."""
        self.db.execute("INSERT INTO quarantine VALUES (?,?,?,?,?,?,?,?)",
                        (sink, run_id, scope, seq, events, reason, location, time.time()))

    @_locked
    def more_quarantined(self, sink: str, run_id: str, events: int) -> None:
        """Later events of a run quarantined before went the same way."""
        self.db.execute("UPDATE quarantine SET events = events + ? WHERE rowid = (SELECT MAX(rowid) FROM"
                        " quarantine WHERE sink=? AND run_id=? AND scope='run')", (events, sink, run_id))

    @_locked
    def quarantined_runs(self, sink: str) -> set[str]:
        return {r for (r,) in self.db.execute(
            "SELECT DISTINCT run_id FROM quarantine WHERE sink=? AND scope='run'", (sink,))}

    @_locked
    def quarantine_rows(self) -> list[dict[str, Any]]:
        """Every quarantine record, oldest first ([] for a store that never had one, even read-only)."""
        keys = ("sink", "run_id", "scope", "seq", "events", "reason", "location", "ts")
        try:
            cur = self.db.execute(f"SELECT {', '.join(keys)} FROM quarantine ORDER BY rowid")
        except sqlite3.OperationalError:  # no such table: nothing was ever quarantined
            return []
        return [dict(zip(keys, row)) for row in cur]

    # --- web UI ---

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection under the store's lock, for the web UI's own read queries
        (``flightlog.agent.ui.queries``): no transaction, so a read never holds up the agent's writer."""
        with self._lock:
            yield self.db


def _when(ts: float | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts or 0).isoformat(timespec="seconds")


def _json_number(value: float) -> float | str:
    """JSON has no NaN/Infinity: export them as strings, the way MLflow's REST API does."""
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value
