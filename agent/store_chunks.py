"""The local store's metric points as compressed columnar chunks per (run, key): the chunk codec (pure, bounded,
fuzzed), the SQL of the ``metric_chunks`` table (append, read, migrate from the row-per-value table) and the
min/max envelope per pixel column that charts draw from. ``agent/store.py`` owns the connection and the lock."""
from __future__ import annotations

import math
import sqlite3
import struct
from collections.abc import Iterable, Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import zstandard

from flightlog.agent import store_columns
from flightlog.proto.errors import StoreCorrupt
from flightlog.proto.events import Metrics

__all__ = ["CHUNK_SCHEMA", "Columns", "Envelope", "PointBuffer", "SEAL_POINTS", "MAX_CHUNK_POINTS", "MAX_OPEN_PIECES",
           "append_points", "count_points", "decode_chunk", "encode_chunk", "envelope", "has_row_table",
           "keys", "last_step", "migrate_rows", "read_columns", "read_row_table"]

#: One row per chunk of a (run, key) series, in the order its points arrived (``seq``). The last few chunks of
#: a series are open pieces (``sealed=0``, stored uncompressed, see ``append_points``) until together they
#: hold SEAL_POINTS points: then they are merged and compressed. An open piece counts the open pieces and
#: their points up to itself (``open_pieces``, ``open_points``): one row says what the series' tail holds. Stats are over the chunk's points
#: (value min/max over its finite values, NULL if none): what a reader prunes and an envelope uses.
CHUNK_SCHEMA = """
CREATE TABLE IF NOT EXISTS metric_chunks (run_id TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
    sealed INTEGER NOT NULL, n INTEGER NOT NULL, min_step INTEGER, max_step INTEGER, min_ts REAL, max_ts REAL,
    min_value REAL, max_value REAL, min_rank INTEGER, max_rank INTEGER, data BLOB NOT NULL,
    open_pieces INTEGER NOT NULL DEFAULT 0, open_points INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS metric_chunks_series ON metric_chunks (run_id, key, seq);
"""

#: An open chunk is sealed (compressed) once it holds this many points; a commit with more for one series
#: writes them as sealed chunks at once. No chunk holds more than MAX_CHUNK_POINTS.
SEAL_POINTS = 512
MAX_CHUNK_POINTS = 16384
MAX_OPEN_PIECES = 32
_SMALL = 16  # points of a commit's series written without numpy
_INSERT = ("INSERT INTO metric_chunks (run_id, key, seq, sealed, n, min_step, max_step, min_ts, max_ts, min_value,"
           " max_value, min_rank, max_rank, data, open_pieces, open_points) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
#: What the decoder accepts at most (a chunk of another build may be bigger than this one writes).
MAX_DECODE_POINTS = 1 << 20

_MAGIC = b"FLC1"
_HEADER = struct.Struct("<4sBBHI")  # magic, codec, reserved (0), reserved (0), points
_RAW, _ZSTD = 0, 1
_POINT_BYTES = 32  # step (delta, i8), ts (f8), value (f8), rank (i8)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_READ_BATCH = 50_000  # rows per fetch when migrating a row table
_FAST_EVENTS = 64  # a batch with fewer Metrics goes the plain way (numpy's per-call cost)
#: A few points of a series as plain lists: steps, timestamps, values, ranks.
_Lists = tuple[list[int], list[float], list[float], list[int]]


class Columns(NamedTuple):
    """One series' points as numpy columns, all the same length."""

    steps: npt.NDArray[np.int64]
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    ranks: npt.NDArray[np.int64]

    @staticmethod
    def empty() -> Columns:
        return Columns(np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64), np.empty(0, np.int64))

    def take(self, index: Any) -> Columns:
        return Columns(self.steps[index], self.ts[index], self.values[index], self.ranks[index])

    def sorted(self, x: Literal["step", "time"] = "step") -> Columns:
        """Stable sort by step then timestamp (``time``: by timestamp then step); ties keep arrival order."""
        first, second = (self.steps, self.ts) if x == "step" else (self.ts, self.steps)
        rising = np.diff(first)
        if not (rising < 0).any() and not (np.diff(second)[rising == 0] < 0).any():
            return self  # already in order (one trainer's steps): no sort
        order = np.lexsort((second, first))  # lexsort is stable: equal keys keep their order
        return self.take(order)


def _concat(parts: list[Columns]) -> Columns:
    if not parts:
        return Columns.empty()
    if len(parts) == 1:
        return parts[0]
    return Columns(*(np.concatenate([p[i] for p in parts]) for i in range(4)))


# --- the codec --------------------------------------------------------------------------------------------------

def encode_chunk(cols: Columns, *, compress: bool, cctx: zstandard.ZstdCompressor | None = None) -> bytes:
    """A chunk's bytes: header, then the columns. Steps are stored as deltas (wrapping int64 arithmetic, so
    any steps round-trip) and, compressed, every column's bytes are grouped by significance (a shuffle) before
    zstd: neighbouring steps, timestamps and ranks then compress to almost nothing."""
    n = len(cols.steps)
    steps = cols.steps.astype(np.int64, copy=False)
    deltas = np.empty(n, np.int64)
    if n:
        deltas[0] = steps[0]
        np.subtract(steps[1:], steps[:-1], out=deltas[1:])
    body = np.concatenate([deltas.view(np.uint8), cols.ts.astype("<f8", copy=False).view(np.uint8),
                           cols.values.astype("<f8", copy=False).view(np.uint8),
                           cols.ranks.astype("<i8", copy=False).view(np.uint8)])
    if not compress:
        return _HEADER.pack(_MAGIC, _RAW, 0, 0, n) + body.tobytes()
    shuffled = body.reshape(4 * n, 8).T.tobytes()  # byte j of every 8-byte value together
    packed = (cctx or zstandard.ZstdCompressor(level=3)).compress(shuffled)
    return _HEADER.pack(_MAGIC, _ZSTD, 0, 0, n) + packed


def decode_chunk(data: bytes, *, max_points: int = MAX_DECODE_POINTS) -> Columns:
    """The columns of a chunk; StoreCorrupt for anything that is not one (never another exception, never more
    memory than ``max_points`` points need)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StoreCorrupt(f"a metric chunk is {type(data).__name__}, not bytes")
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise StoreCorrupt(f"a metric chunk of {len(data)} bytes is shorter than its header")
    magic, codec, r1, r2, n = _HEADER.unpack_from(data)
    if magic != _MAGIC or r1 or r2:
        raise StoreCorrupt("a metric chunk does not start with the chunk header (not a flightlog chunk)")
    if n > max_points:
        raise StoreCorrupt(f"a metric chunk claims {n} points, more than the {max_points} allowed")
    size = n * _POINT_BYTES
    payload = data[_HEADER.size:]
    if codec == _RAW:
        body = payload
    elif codec == _ZSTD:
        try:
            params = zstandard.get_frame_parameters(payload)
            if params.content_size != size:
                raise StoreCorrupt(f"a metric chunk's zstd frame holds {params.content_size} bytes, not {size}")
            body = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise StoreCorrupt(f"a metric chunk does not decompress: {exc}") from exc
    else:
        raise StoreCorrupt(f"a metric chunk has an unknown codec {codec}")
    if len(body) != size:
        raise StoreCorrupt(f"a metric chunk of {n} points holds {len(body)} bytes, not {size}")
    arr = np.frombuffer(body, np.uint8)
    if codec == _ZSTD:
        arr = arr.reshape(8, 4 * n).T.reshape(-1)  # undo the shuffle
    words = arr.view("<i8") if n else np.empty(0, "<i8")
    steps = np.cumsum(words[:n], dtype=np.int64)  # wraps exactly as the deltas did
    ts = words[n:2 * n].view("<f8").astype(np.float64)
    values = words[2 * n:3 * n].view("<f8").astype(np.float64)
    ranks = words[3 * n:].astype(np.int64)
    return Columns(steps, ts, values, ranks)


# --- writing ----------------------------------------------------------------------------------------------------

class PointBuffer:
    """The points of one transaction, per (run, key), in arrival order, as parts: numpy columns for a batch's
    stretches of events of one run and keys (steps, timestamps and ranks shared by the keys), plain lists for
    the rest (a trickle, events with keys of their own)."""

    __slots__ = ("series",)

    def __init__(self) -> None:
        # (run, key) -> its parts, in arrival order
        self.series: dict[tuple[str, str], list[_Lists | Columns]] = {}

    def _lists(self, run_id: str, key: str) -> _Lists:
        parts = self.series.get((run_id, key))
        if parts is None:
            parts = self.series[(run_id, key)] = []
        if not parts or type(parts[-1]) is Columns:
            parts.append(([], [], [], []))
        return parts[-1]  # type: ignore[return-value]

    def add(self, run_id: str, step: int, ts: float, values: dict[str, float], rank: int) -> None:
        """One event's values."""
        for k, v in values.items():
            s, t, vs, r = self._lists(run_id, k)
            s.append(step)
            t.append(ts)
            vs.append(v)
            r.append(rank)

    def add_metrics(self, events: list[Metrics], *, fast_from: int = _FAST_EVENTS,
                    min_rows: int = store_columns.MIN_ROWS) -> None:
        """Many Metrics events, in order: stretches of ``min_rows`` events or more of one layout as numpy columns
        read from their msgpack encoding (``store_columns``: no Python work per event), the rest (and a batch
        of fewer than ``fast_from`` events) the plain way."""
        if len(events) < fast_from:
            self._add_plain(events)
            return
        series = self.series
        for seg in store_columns.segments(events, min_rows=min_rows):
            if not seg.columns:
                self._add_plain(events[seg.start:seg.stop])
                continue
            for k, column in zip(seg.keys, seg.values, strict=True):
                parts = series.get((seg.run_id, k))
                if parts is None:
                    parts = series[(seg.run_id, k)] = []
                parts.append(Columns(seg.steps, seg.ts, column, seg.ranks))

    def _add_plain(self, events: list[Metrics]) -> None:
        """The common case, every event of a run with the same keys, takes each column with one comprehension
        (plain lists: a few points are cheaper so than with numpy); anything else event by event."""
        if not events:
            return
        runs = {ev.run_id for ev in events}
        by_run: dict[str, list[Metrics]] = {runs.pop(): events} if len(runs) == 1 else {}
        if not by_run:
            for ev in events:
                group = by_run.get(ev.run_id)
                if group is None:
                    group = by_run[ev.run_id] = []
                group.append(ev)
        for run_id, group in by_run.items():
            dicts = [ev.values for ev in group]
            keys = list(dicts[0])
            try:
                columns = [[d[k] for d in dicts] for k in keys]
            except KeyError:
                columns = []
            # every event has the first one's keys and, counted together, no more: the same keys throughout
            if not columns or sum(map(len, dicts)) != len(keys) * len(dicts):
                for ev in group:
                    self.add(run_id, ev.step, ev.timestamp, ev.values, ev.rank)
                continue
            steps, ts, ranks = [ev.step for ev in group], [ev.timestamp for ev in group], [ev.rank for ev in group]
            for k, values in zip(keys, columns, strict=True):
                s, t, vs, r = self._lists(run_id, k)
                s.extend(steps)
                t.extend(ts)
                vs.extend(values)
                r.extend(ranks)

    def __len__(self) -> int:
        return sum(_part_len(p) for parts in self.series.values() for p in parts)

    def columns(self) -> Iterator[tuple[str, str, Columns]]:
        for (run_id, key), parts in self.series.items():
            yield run_id, key, _to_columns(run_id, key, parts)


def _part_len(part: _Lists | Columns) -> int:
    return len(part[0])


def _to_columns(run_id: str, key: str, parts: list[_Lists | Columns]) -> Columns:
    out: list[Columns] = []
    for part in parts:
        if type(part) is Columns:
            out.append(part)
            continue
        steps, ts, values, ranks = part
        try:
            out.append(Columns(np.array(steps, np.int64), np.array(ts, np.float64), np.array(values, np.float64),
                               np.array(ranks, np.int64)))
        except OverflowError as exc:  # what SQLite said of a row per value: the engine quarantines that event
            raise OverflowError(f"a step or rank of {key!r} in run {run_id!r} is too large for a 64-bit SQLite"
                                f" INTEGER ({exc})") from exc
    return _concat(out)


def append_points(db: sqlite3.Connection, buffer: PointBuffer, cctx: zstandard.ZstdCompressor) -> int:
    """Write a transaction's points (inside the caller's transaction). Returns the number of points written.

    A series ends in a few open pieces (uncompressed, ``sealed=0``): a small commit adds one, so a trickle
    costs one small INSERT per commit, as a row per value did. When the pieces would reach MAX_OPEN_PIECES,
    or hold SEAL_POINTS points with the new ones, they are merged: into sealed, compressed chunks once there
    are SEAL_POINTS points, else into one open piece."""
    written = 0
    for (run_id, key), parts in buffer.series.items():
        m = sum(map(_part_len, parts))
        written += m
        last = db.execute("SELECT seq, open_pieces, open_points FROM metric_chunks WHERE run_id=? AND key=?"
                          " ORDER BY seq DESC LIMIT 1", (run_id, key)).fetchone()
        seq, pieces, points = (0, 0, 0) if last is None else (int(last[0]) + 1, int(last[1]), int(last[2]))
        # a bigger commit also merges: only the last piece's counters are ever read
        merge = pieces > 0 and (pieces + 1 >= MAX_OPEN_PIECES or points + m >= SEAL_POINTS or m > _SMALL)
        first = parts[0]
        if not merge and m <= _SMALL and not isinstance(first, Columns):  # numpy columns hold more points
            db.execute(_INSERT, (run_id, key, seq, 0, *_small_piece(run_id, key, first), pieces + 1, points + m))
            continue
        new = _to_columns(run_id, key, parts)
        if merge:
            seq -= pieces
            rows = db.execute("SELECT data FROM metric_chunks WHERE run_id=? AND key=? AND seq>=? ORDER BY seq",
                              (run_id, key, seq)).fetchall()
            new = _concat([*(decode_chunk(data) for (data,) in rows), new])
            db.execute("DELETE FROM metric_chunks WHERE run_id=? AND key=? AND seq>=?", (run_id, key, seq))
        _write_series(db, run_id, key, seq, new, cctx)
    return written


def _small_piece(run_id: str, key: str, lists: _Lists) -> tuple[Any, ...]:
    """Stats and bytes of an open piece of a few points, without numpy (whose per-call cost is what a trickle
    would pay): the same bytes ``encode_chunk(..., compress=False)`` makes."""
    steps, ts, values, ranks = lists
    if not all(_INT64_MIN <= v <= _INT64_MAX for v in (*steps, *ranks)):
        raise OverflowError(f"a step or rank of {key!r} in run {run_id!r} is too large for a 64-bit SQLite INTEGER")
    m = len(steps)
    deltas = [steps[0], *((b - a + (1 << 63)) % (1 << 64) - (1 << 63) for a, b in zip(steps, steps[1:]))]
    blob = _HEADER.pack(_MAGIC, _RAW, 0, 0, m) + struct.pack(f"<{m}q{m}d{m}d{m}q", *deltas, *ts, *values, *ranks)
    fin = [v for v in values if math.isfinite(v)]
    return (m, min(steps), max(steps), min(ts), max(ts), min(fin) if fin else None, max(fin) if fin else None,
            min(ranks), max(ranks), blob)


def _write_series(db: sqlite3.Connection, run_id: str, key: str, seq: int, cols: Columns,
                  cctx: zstandard.ZstdCompressor, *, seal_all: bool = False) -> int:
    """Chunks of at most MAX_CHUNK_POINTS from ``seq`` on; the last stays open when it is small. Returns the
    next seq."""
    n = len(cols.steps)
    start = 0
    while start < n:
        part = cols.take(slice(start, start + MAX_CHUNK_POINTS))
        start += len(part.steps)
        sealed = seal_all or start < n or len(part.steps) >= SEAL_POINTS
        open_n = 0 if sealed else len(part.steps)
        db.execute(_INSERT, (run_id, key, seq, int(sealed), *_stats(part), encode_chunk(part, compress=sealed, cctx=cctx),
                             int(not sealed), open_n))
        seq += 1
    return seq


def _stats(c: Columns) -> tuple[Any, ...]:
    if len(c.steps) <= 16:  # a trickle's piece: plain Python is cheaper than numpy's per-call overhead
        steps, ts, ranks = c.steps.tolist(), c.ts.tolist(), c.ranks.tolist()
        fin = [v for v in c.values.tolist() if math.isfinite(v)]
        return (len(steps), min(steps), max(steps), min(ts), max(ts), min(fin) if fin else None,
                max(fin) if fin else None, min(ranks), max(ranks))
    finite = c.values[np.isfinite(c.values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (None, None)
    return (len(c.steps), int(c.steps.min()), int(c.steps.max()), float(c.ts.min()), float(c.ts.max()), vmin, vmax,
            int(c.ranks.min()), int(c.ranks.max()))


# --- reading ----------------------------------------------------------------------------------------------------

def has_row_table(db: sqlite3.Connection) -> bool:
    """Whether the store still has the row-per-value ``metrics`` table (a store of an older version)."""
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='metrics'").fetchone() is not None


def _has_chunks(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='metric_chunks'").fetchone() is not None


def read_columns(db: sqlite3.Connection, run_id: str, key: str, *, rank: int | None = None,
                 x: Literal["step", "time"] = "step", lo: float | None = None, hi: float | None = None) -> Columns:
    """One series' points in arrival order (not sorted), of one rank or all, within [lo, hi] of the x axis
    when given (chunks outside it are not decoded)."""
    if not _has_chunks(db):
        return read_row_table(db, run_id, key, rank)  # a read-only store of an older version
    lo_col, hi_col = ("min_step", "max_step") if x == "step" else ("min_ts", "max_ts")
    sql = "SELECT data FROM metric_chunks WHERE run_id=? AND key=?"
    args: list[Any] = [run_id, key]
    if rank is not None:
        sql += " AND min_rank <= ? AND max_rank >= ?"
        args += [rank, rank]
    if lo is not None:
        sql += f" AND {hi_col} >= ?"
        args.append(lo)
    if hi is not None:
        sql += f" AND {lo_col} <= ?"
        args.append(hi)
    cols = _concat([decode_chunk(data) for (data,) in db.execute(sql + " ORDER BY seq", args)])
    mask = None if rank is None else cols.ranks == rank
    if lo is not None or hi is not None:
        xs = cols.steps if x == "step" else cols.ts
        inside = (xs >= (-np.inf if lo is None else lo)) & (xs <= (np.inf if hi is None else hi))
        mask = inside if mask is None else mask & inside
    return cols if mask is None else cols.take(mask)


def read_row_table(db: sqlite3.Connection, run_id: str, key: str, rank: int | None = None) -> Columns:
    """One series from the row-per-value table (NULL, the old store's NaN, back to NaN), in row order."""
    rank_col = "rank" if any(r[1] == "rank" for r in db.execute("PRAGMA table_info(metrics)")) else "0"
    sql = f"SELECT step, ts, value, {rank_col} FROM metrics WHERE run_id=? AND key=?"
    args: list[Any] = [run_id, key]
    if rank is not None:
        sql += f" AND {rank_col}=?"
        args.append(rank)
    rows = db.execute(sql + " ORDER BY rowid", args).fetchall()
    return _rows_to_columns(rows) if rows else Columns.empty()


def _rows_to_columns(rows: list[tuple[Any, ...]]) -> Columns:
    steps, ts, values, ranks = zip(*rows, strict=True)
    return Columns(np.array(steps, np.int64), np.array(ts, np.float64),
                   np.array([np.nan if v is None else v for v in values], np.float64), np.array(ranks, np.int64))


def keys(db: sqlite3.Connection, run_id: str) -> list[str]:
    table = "metric_chunks" if _has_chunks(db) else "metrics"
    return [k for (k,) in db.execute(f"SELECT DISTINCT key FROM {table} WHERE run_id=? ORDER BY key", (run_id,))]


def count_points(db: sqlite3.Connection, run_id: str | None = None, key: str | None = None) -> int:
    """How many points the store holds (of a run, of one key of it)."""
    chunks = _has_chunks(db)
    sql = "SELECT COALESCE(SUM(n), 0) FROM metric_chunks WHERE 1" if chunks else "SELECT COUNT(*) FROM metrics WHERE 1"
    args: list[Any] = []
    if run_id is not None:
        sql += " AND run_id=?"
        args.append(run_id)
    if key is not None:
        sql += " AND key=?"
        args.append(key)
    return int(db.execute(sql, args).fetchone()[0])


def last_step(db: sqlite3.Connection, run_id: str, skip_prefix: str) -> int | None:
    table, col = ("metric_chunks", "max_step") if _has_chunks(db) else ("metrics", "step")
    (step,) = db.execute(
        f"SELECT MAX({col}) FROM {table} WHERE run_id=?1 AND (?2 = '' OR substr(key, 1, length(?2)) != ?2)",
        (run_id, skip_prefix)).fetchone()
    return None if step is None else int(step)


# --- the envelope -----------------------------------------------------------------------------------------------

class Envelope(NamedTuple):
    """A series reduced to ``columns`` equal-width bins of the x axis (pixel columns): bin i covers
    ``edges[i] <= x < edges[i+1]`` (the last one includes ``edges[-1]``). For each bin: how many finite
    points fall in it (``n``), their min and max (so a spike is never hidden), and the first and last of them
    in x order (ties: by the other axis, then arrival) to join neighbouring bins with a line. Empty bins hold
    NaN and an ``n`` of 0. NaN and infinite values are left out, as ``metric_series`` leaves them out."""

    edges: npt.NDArray[np.float64]
    n: npt.NDArray[np.int64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    first: npt.NDArray[np.float64]
    last: npt.NDArray[np.float64]


def envelope(cols: Columns, columns: int, x: Literal["step", "time"] = "step", lo: float | None = None,
             hi: float | None = None) -> Envelope:
    """The envelope of ``cols`` (any order) over [lo, hi] (default: the finite points' x range)."""
    if columns < 1:
        raise ValueError(f"an envelope needs at least one column, not {columns}")
    cols = cols.take(np.isfinite(cols.values)).sorted(x)
    xs = (cols.steps if x == "step" else cols.ts).astype(np.float64)
    lo_f = float(xs[0]) if lo is None and len(xs) else float(lo or 0.0)
    hi_f = float(xs[-1]) if hi is None and len(xs) else float(hi if hi is not None else lo_f)
    inside = (xs >= lo_f) & (xs <= hi_f)
    xs, vs = xs[inside], cols.values[inside]
    width = (hi_f - lo_f) / columns
    edges = lo_f + width * np.arange(columns + 1, dtype=np.float64)
    edges[-1] = hi_f
    if width > 0:
        idx = np.minimum(((xs - lo_f) / width).astype(np.int64), columns - 1)
    else:
        idx = np.zeros(len(xs), np.int64)
    count = np.bincount(idx, minlength=columns).astype(np.int64)
    out = [np.full(columns, np.nan) for _ in range(4)]
    full = np.flatnonzero(count)
    if len(full):
        starts = (np.cumsum(count) - count)[full]
        out[0][full] = np.minimum.reduceat(vs, starts)
        out[1][full] = np.maximum.reduceat(vs, starts)
        out[2][full] = vs[starts]
        out[3][full] = vs[starts + count[full] - 1]
    return Envelope(edges, count, *out)


# --- migration ------------------------------------------------------------------------------------------------

def migrate_rows(db: sqlite3.Connection, cctx: zstandard.ZstdCompressor) -> int:
    """Move a row-per-value ``metrics`` table into chunks (inside the caller's transaction) and drop it; each
    series keeps its rows' order. Returns the number of points moved (0: nothing to migrate)."""
    if not has_row_table(db):
        return 0
    rank_col = "rank" if any(r[1] == "rank" for r in db.execute("PRAGMA table_info(metrics)")) else "0"
    cur = db.execute(f"SELECT run_id, key, step, ts, value, {rank_col} FROM metrics ORDER BY run_id, key, rowid")
    moved = 0
    for run_id, key, rows in _series_rows(cur):
        last = db.execute("SELECT MAX(seq) FROM metric_chunks WHERE run_id=? AND key=?", (run_id, key)).fetchone()
        seq = 0 if last[0] is None else int(last[0]) + 1
        _write_series(db, run_id, key, seq, _rows_to_columns(rows), cctx, seal_all=True)
        moved += len(rows)
    db.execute("DROP TABLE metrics")
    return moved


def _series_rows(cur: sqlite3.Cursor) -> Iterable[tuple[str, str, list[tuple[Any, ...]]]]:
    current: tuple[str, str] | None = None
    rows: list[tuple[Any, ...]] = []
    while batch := cur.fetchmany(_READ_BATCH):
        for run_id, key, *point in batch:
            if (run_id, key) != current:
                if rows and current is not None:
                    yield current[0], current[1], rows
                current, rows = (run_id, key), []
            rows.append(tuple(point))
            if len(rows) >= MAX_CHUNK_POINTS and current is not None:
                yield current[0], current[1], rows  # a long series: written chunk by chunk
                rows = []
    if rows and current is not None:
        yield current[0], current[1], rows
