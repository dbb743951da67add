"""The local store's columnar chunks: the codec round-trips and refuses corrupt bytes with StoreCorrupt (fuzzed,
bounded), points are chunks not rows, a rolled-back batch leaves no trace, the read API (arrays, envelope) and
the migration of a store of today's row-per-value schema on open."""
from __future__ import annotations

import math
import sqlite3
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.agent import store_chunks as sc
from flightlog.agent.store import Store
from flightlog.proto.errors import FlightlogError, StoreCorrupt
from flightlog.proto.events import Metrics, RunStart, SystemStats

I64 = st.integers(-(1 << 63), (1 << 63) - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


def _cols(points: list[tuple[int, float, float, int]]) -> sc.Columns:
    if not points:
        return sc.Columns.empty()
    s, t, v, r = zip(*points, strict=True)
    return sc.Columns(np.array(s, np.int64), np.array(t, np.float64), np.array(v, np.float64), np.array(r, np.int64))


def _bits(c: sc.Columns) -> list[list[int]]:
    return [c.steps.tolist(), c.ts.view(np.int64).tolist(), c.values.view(np.int64).tolist(), c.ranks.tolist()]


# --- the codec -----------------------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(I64, FLOATS, FLOATS, I64), max_size=300), st.booleans())
def test_a_chunk_round_trips_every_bit(points: list[tuple[int, float, float, int]], compress: bool) -> None:
    cols = _cols(points)
    assert _bits(sc.decode_chunk(sc.encode_chunk(cols, compress=compress))) == _bits(cols)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(I64, FLOATS, FLOATS, I64), min_size=1, max_size=16))
def test_a_small_piece_is_the_bytes_of_an_open_chunk(points: list[tuple[int, float, float, int]]) -> None:
    lists = tuple(list(col) for col in zip(*points, strict=True))
    *stats, blob = sc._small_piece("r", "k", lists)  # type: ignore[arg-type]
    cols = _cols(points)
    assert blob == sc.encode_chunk(cols, compress=False) and stats[0] == len(points)
    assert (stats[1], stats[2]) == (min(p[0] for p in points), max(p[0] for p in points))


def _valid_chunk() -> bytes:
    cols = _cols([(i, 1.7e9 + i, math.sin(i), i % 3) for i in range(200)])
    return sc.encode_chunk(cols, compress=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_corrupt_chunk_is_store_corrupt_and_nothing_else(data: st.DataObject) -> None:
    blob = bytearray(data.draw(st.sampled_from([_valid_chunk(), sc.encode_chunk(_cols([(1, 2.0, 3.0, 0)] * 40),
                                                                                compress=False)])))
    how = data.draw(st.sampled_from(["flip", "cut", "random", "header"]))
    if how == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[pos] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    elif how == "random":
        blob = bytearray(data.draw(st.binary(max_size=600)))
    else:
        blob[:12] = struct.pack("<4sBBHI", b"FLC1", data.draw(st.integers(0, 3)), 0, 0,
                                data.draw(st.integers(0, (1 << 32) - 1)))
    try:
        cols = sc.decode_chunk(bytes(blob))
    except StoreCorrupt:
        return
    assert len({len(c) for c in cols}) == 1  # decoded: a well-formed chunk of some points


def test_a_chunk_claiming_huge_sizes_is_refused_before_allocating() -> None:
    header = struct.Struct("<4sBBHI")
    small = zstandard.ZstdCompressor().compress(b"\0" * 1000)
    big = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # a bomb: 64 MiB of zeros in a few KiB
    tracemalloc.start()
    try:
        with pytest.raises(StoreCorrupt, match="claims"):
            sc.decode_chunk(header.pack(b"FLC1", 1, 0, 0, (1 << 32) - 1) + b"\0" * 64)
        with pytest.raises(StoreCorrupt, match="zstd frame holds"):  # 1000 bytes for a chunk of 10 points
            sc.decode_chunk(header.pack(b"FLC1", 1, 0, 0, 10) + small)
        with pytest.raises(StoreCorrupt, match="zstd frame holds"):
            sc.decode_chunk(header.pack(b"FLC1", 1, 0, 0, 1000) + big)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()


# --- writing -------------------------------------------------------------------------------------------------------

def _chunk_rows(store: Store) -> list[tuple[Any, ...]]:
    return store.db.execute("SELECT run_id, key, seq, sealed, n FROM metric_chunks ORDER BY run_id, key, seq").fetchall()


def test_points_are_chunks_not_rows_at_a_trickle_and_in_a_flood(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        with store.transaction():
            store.apply([RunStart("r", "r", 1.0)])
        for i in range(1200):  # a trickle: one point per commit
            with store.transaction():
                store.apply([Metrics("r", i, float(i), {"loss": float(i)})])
        with store.transaction():  # a flood: 40,000 points of two keys in one commit
            store.apply([Metrics("f", i, float(i), {"a": 1.0, "b": float(i)}) for i in range(20_000)])
        rows = _chunk_rows(store)
        trickle = [r[3:] for r in rows if r[0] == "r"]  # sealed chunks of 512, then open pieces
        assert trickle[:2] == [(1, 512), (1, 512)] and {s for s, _ in trickle[2:]} == {0}
        assert sum(n for _, n in trickle[2:]) == 176 and len(trickle[2:]) < sc.MAX_OPEN_PIECES
        assert sum(r[4] for r in rows if r[0] == "f") == 40_000 and len([r for r in rows if r[0] == "f"]) == 4
        assert all(r[4] <= sc.MAX_CHUNK_POINTS for r in rows)
        assert store.metric_count() == 41_200 and store.metric_count("f", "b") == 20_000
        assert store.metric_arrays("r", "loss")[0].tolist() == list(range(1200))
        assert store.runs()[0]["points"] == 1200


def test_a_rolled_back_batch_leaves_the_open_chunk_as_it_was(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        with store.transaction():
            store.apply([Metrics("r", i, 1.0, {"m": float(i)}) for i in range(10)])
        with pytest.raises(OverflowError, match="SQLite INTEGER"), store.transaction():
            store.apply([Metrics("r", 10, 1.0, {"m": 10.0}), Metrics("r", 2**63, 1.0, {"m": 1.0})])
        assert store.metric_arrays("r", "m")[0].tolist() == list(range(10))
        with store.transaction():
            store.apply([Metrics("r", 11, 1.0, {"m": 11.0})])
        assert store.metric_arrays("r", "m")[0].tolist() == [*range(10), 11]


def test_a_flood_with_one_step_past_int64_is_refused_whole_and_the_next_one_lands(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        with store.transaction():  # read as columns (store_columns), not the plain way
            store.apply([Metrics("r", i, 1.0, {"m": float(i), "n": 1.0}) for i in range(1000)])
        bad = [Metrics("r", i, 1.0, {"m": float(i), "n": 1.0}) for i in range(1000, 2000)]
        bad[500] = Metrics("r", 2**63, 1.0, {"m": 1.0, "n": 1.0})
        with pytest.raises(OverflowError, match="SQLite INTEGER"), store.transaction():
            store.apply(bad)
        assert store.metric_count() == 2000
        with store.transaction():
            store.apply([Metrics("r", i, 1.0, {"m": float(i), "n": 1.0}) for i in range(1000, 2000)])
        assert store.metric_arrays("r", "m")[0].tolist() == list(range(2000)) and store.metric_count() == 4000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 30), st.sampled_from([1.0, 2.0]),
                          st.dictionaries(st.sampled_from(["x", "y", "system/z"]), FLOATS, max_size=3),
                          st.integers(0, 2), st.booleans()), max_size=120),
       st.lists(st.integers(1, 60), min_size=1, max_size=8))
def test_any_events_in_any_commits_export_as_a_row_per_value_would(
        tmp_path_factory: pytest.TempPathFactory, evs: list[tuple[Any, ...]], cuts: list[int]) -> None:
    events: list[Any] = [Metrics(r, s, t, v, k) if not sysstat else SystemStats(r, t, v, s)
                         for r, s, t, v, k, sysstat in evs]
    rows = [(r, key, s, t, val, 0 if sysstat else k, i)
            for i, (r, s, t, v, k, sysstat) in enumerate(evs) for key, val in v.items()]
    with Store(tmp_path_factory.mktemp("s") / "s.db") as store:
        i = 0
        for cut in cuts * 20:
            if i >= len(events):
                break
            with store.transaction():
                store.apply(events[i:i + cut])
            i += cut
        for run in ("a", "b"):
            mine = sorted((row for row in rows if row[0] == run), key=lambda row: (row[1], row[2], row[3], row[6]))
            got = [(p["key"], p["step"], p["timestamp"], p["value"], p["rank"]) for p in store.metric_points(run)]

            def num(v: float) -> Any:
                return "NaN" if v != v else "Infinity" if v == math.inf else "-Infinity" if v == -math.inf else v

            assert got == [(k, s, t, num(v), rk) for _, k, s, t, v, rk, _ in mine]


# --- reading -------------------------------------------------------------------------------------------------------

def test_metric_arrays_sorted_by_step_then_time_per_rank(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store, store.transaction():
        store.apply([RunStart("r", "r", 1.0),
                     Metrics("r", 5, 3.0, {"m": 1.0}, 0), Metrics("r", 2, 9.0, {"m": float("nan")}, 1),
                     Metrics("r", 5, 2.0, {"m": float("inf")}, 1), Metrics("r", 2, 1.0, {"m": 4.0}, 0),
                     SystemStats("r", 7.0, {"system/cpu": 3.0}, 1)])
    with Store(tmp_path / "s.db", readonly=True) as ro:
        steps, ts, values = ro.metric_arrays("r", "m")
        assert (steps.dtype, ts.dtype, values.dtype) == (np.int64, np.float64, np.float64)
        assert steps.tolist() == [2, 2, 5, 5] and ts.tolist() == [1.0, 9.0, 2.0, 3.0]
        assert values.tolist()[0] == 4.0 and math.isnan(values[1]) and values.tolist()[2:] == [math.inf, 1.0]
        assert ro.metric_arrays("r", "m", rank=1)[0].tolist() == [2, 5]
        assert ro.metric_series("r", "m") == [(2, 4.0), (5, 1.0)]
        assert ro.metric_arrays("r", "nothing")[0].tolist() == []


def _brute_envelope(points: list[tuple[float, float]], columns: int, lo: float, hi: float) -> list[Any]:
    width = (hi - lo) / columns
    bins: list[list[float]] = [[] for _ in range(columns)]
    for x, v in sorted(points, key=lambda p: p[0]):
        if lo <= x <= hi and math.isfinite(v):
            bins[min(int((x - lo) / width), columns - 1) if width > 0 else 0].append(v)
    return [(len(b), min(b), max(b), b[0], b[-1]) if b else (0,) for b in bins]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 500), st.floats(-1e6, 1e6) | st.just(math.nan)), min_size=1,
                max_size=200, unique_by=lambda p: p[0]), st.integers(1, 40))
def test_the_envelope_is_min_max_first_last_per_column(points: list[tuple[int, float]], columns: int) -> None:
    cols = _cols([(s, 1.0, v, 0) for s, v in points])
    env = sc.envelope(cols, columns)
    finite = [(float(s), v) for s, v in points if math.isfinite(v)]
    if not finite:
        assert env.n.sum() == 0
        return
    lo, hi = min(x for x, _ in finite), max(x for x, _ in finite)
    got = [(int(env.n[i]),) if not env.n[i] else
           (int(env.n[i]), env.min[i], env.max[i], env.first[i], env.last[i]) for i in range(columns)]
    assert got == _brute_envelope(finite, columns, lo, hi)
    assert env.edges[0] == lo and env.edges[-1] == hi


def test_a_spike_survives_the_envelope_and_the_range_is_pruned(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        for start in range(0, 100_000, 5000):
            with store.transaction():
                store.apply([Metrics("r", i, 1e9 + i / 100, {"loss": 1e6 if i == 77_777 else 1.0})
                             for i in range(start, start + 5000)])
        env = store.metric_envelope("r", "loss", 100)
        assert env.n.sum() == 100_000 and env.max.max() == 1e6 and env.max[77] == 1e6 and env.min[77] == 1.0
        part = store.metric_envelope("r", "loss", 10, lo=10_000, hi=19_999)
        assert part.n.tolist() == [1000] * 10
        by_time = store.metric_envelope("r", "loss", 4, x="time", lo=1e9 + 100, hi=1e9 + 200)
        assert by_time.n.sum() == 10_001 and by_time.edges[0] == 1e9 + 100


# --- migration of a store of today's schema ------------------------------------------------------------------------

#: The row-per-value table as the store wrote it until this change (agent/store.py's SCHEMA, the metrics lines).
ROW_SCHEMA = """
CREATE TABLE metrics (run_id TEXT, key TEXT, step INTEGER, ts REAL, value REAL, rank INTEGER NOT NULL DEFAULT 0);
CREATE INDEX metrics_run_key_step ON metrics (run_id, key, step);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT, status TEXT, created_at REAL,
    ended_at REAL, error TEXT, config TEXT, config_hash TEXT, host TEXT, pid INTEGER, rank INTEGER,
    tags TEXT, sinks TEXT, metadata TEXT, dropped INTEGER DEFAULT 0);
"""


def _row_store(path: Path, rows: list[tuple[Any, ...]]) -> None:
    db = sqlite3.connect(path)
    db.executescript(ROW_SCHEMA)
    db.execute("INSERT INTO runs (run_id, name, status, created_at) VALUES ('a', 'a', 'completed', 1.0)")
    db.executemany("INSERT INTO metrics VALUES (?,?,?,?,?,?)", rows)  # NaN went in as NULL
    db.commit()
    db.close()


def _rows() -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for i in range(3000):
        v = [0.5, None, math.inf, -math.inf, -0.0, float(i)][i % 6]
        rows.append(("a", ["loss", "acc", "system/cpu"][i % 3], (i * 7) % 50, float(i % 4), v, i % 2))
    rows.append(("b", "loss", 3, 1.0, 2.0, 0))
    return rows


def _expected_export(rows: list[tuple[Any, ...]], run: str) -> list[dict[str, Any]]:
    mine = [(r, i) for i, r in enumerate(rows) if r[0] == run]
    mine.sort(key=lambda ri: (ri[0][1], ri[0][2], ri[0][3], ri[1]))

    def num(v: float | None) -> float | str:
        return "NaN" if v is None else ("Infinity" if v == math.inf else "-Infinity" if v == -math.inf else v + 0.0)

    return [{"run": run, "key": k, "step": s, "timestamp": t, "value": num(v), "rank": rk}
            for (_, k, s, t, v, rk), _ in mine]


def test_a_row_store_reads_the_same_before_and_after_migration(tmp_path: Path) -> None:
    rows = _rows()
    _row_store(tmp_path / "old.db", rows)
    expected = _expected_export(rows, "a")
    with Store(tmp_path / "old.db", readonly=True) as ro:  # not migrated: read-only never writes
        assert list(ro.metric_points("a")) == expected
        before = (ro.metric_keys("a"), ro.metric_series("a", "loss"), ro.last_step("a"), ro.runs(), ro.metric_count())
    with Store(tmp_path / "old.db") as store:  # a writer migrates on open
        assert store.db.execute("SELECT name FROM sqlite_master WHERE name='metrics'").fetchone() is None
        assert list(store.metric_points("a")) == expected
        assert list(store.metric_points("a", "acc")) == [p for p in expected if p["key"] == "acc"]
        after = (store.metric_keys("a"), store.metric_series("a", "loss"), store.last_step("a"), store.runs(),
                 store.metric_count())
        assert after == before and after[0] == ["acc", "loss", "system/cpu"] and after[-1] == 3001
        with store.transaction():  # and goes on from there
            store.apply([Metrics("b", 4, 2.0, {"loss": 1.0})])
        assert store.metric_arrays("b", "loss")[0].tolist() == [3, 4]


def test_a_store_from_before_ranks_migrates_as_rank_zero(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE metrics (run_id TEXT, key TEXT, step INTEGER, ts REAL, value REAL)")
    db.executemany("INSERT INTO metrics VALUES ('r', 'loss', ?, 1.0, 0.5)", [(i,) for i in range(20_000)])
    db.commit()
    db.close()
    with Store(tmp_path / "old.db") as store:
        assert {p["rank"] for p in store.metric_points("r")} == {0} and store.metric_count("r") == 20_000
        assert all(r[3] == 1 for r in _chunk_rows(store))  # migrated chunks are sealed


def test_a_failed_migration_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    _row_store(tmp_path / "old.db", [("r", "loss", 1, 1.0, 0.5, 0), ("r", "loss", "two", 1.0, 0.5, 0)])
    with pytest.raises(FlightlogError, match="cannot move the metric rows"):
        Store(tmp_path / "old.db")
    db = sqlite3.connect(tmp_path / "old.db")
    assert db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 2
    assert db.execute("SELECT COUNT(*) FROM metric_chunks").fetchone()[0] == 0
    db.close()


# --- Metrics read from their encoding (store_columns) ---------------------------------------------------------------

#: Steps and ranks at msgpack's integer width boundaries (fixint, 8, 16, 32, 64 bits, either sign, past int64).
EDGE_INTS = st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64,
                             -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63, -2**63 - 1])
STRETCH = st.tuples(st.sampled_from(["a", "b", "r" * 40, "é" * 300]),  # fixstr, str8, str16 run ids
                    st.lists(st.sampled_from(["x", "y", "loss/" + "k" * 40, "é"]), unique=True, max_size=3),
                    st.integers(1, 40), st.one_of(EDGE_INTS, I64), st.integers(-3, 300), st.one_of(EDGE_INTS, I64),
                    st.one_of(FLOATS, st.integers(-2**70, 2**70)), st.booleans())


def _series_bits(events: list[Metrics], fast: bool) -> Any:
    pb = sc.PointBuffer()
    try:
        if fast:
            pb.add_metrics(events, fast_from=0, min_rows=1)
        else:
            pb._add_plain(events)
        return {(run, key): _bits(cols) for run, key, cols in pb.columns()}
    except OverflowError:
        return OverflowError


@settings(max_examples=200, deadline=None)
@given(st.lists(STRETCH, max_size=6), st.randoms(use_true_random=False))
def test_metrics_read_from_their_encoding_are_the_plain_points_bit_for_bit(stretches: list[tuple[Any, ...]],
                                                                          rnd: Any) -> None:
    events: list[Metrics] = []
    for run, keys, count, step, stride, rank, value, odd in stretches:
        for i in range(count):
            vals: dict[str, Any] = {k: value if j == i % 3 else rnd.choice([math.nan, -0.0, 1e300, rnd.random()])
                                    for j, k in enumerate(keys)}
            if odd and i == count // 2:  # one event of the stretch with its keys in another order
                vals = dict(reversed(vals.items()))
            events.append(Metrics(run, step + i * stride if abs(step) < 2**62 else step, rnd.random(), vals, rank))
    assert _series_bits(events, fast=True) == _series_bits(events, fast=False)


def test_a_batch_of_one_layout_is_read_as_columns_in_one_stretch() -> None:
    from flightlog.agent import store_columns
    from flightlog.proto import decode_event, encode_event

    events = [decode_event(encode_event(Metrics("r", 1000 + i, 1.7e9 + i, {"loss": i / 7, "acc": -i}, 3)))
              for i in range(5000)]
    segs = store_columns.segments(events)  # type: ignore[arg-type]
    assert [(s.start, s.stop, s.columns, s.keys) for s in segs] == [(0, 5000, True, ["loss", "acc"])]
    assert segs[0].steps.tolist() == list(range(1000, 6000)) and set(segs[0].ranks.tolist()) == {3}
    assert segs[0].values[1].tolist() == [float(-i) for i in range(5000)]
    # steps crossing integer widths (127 -> 128 -> 256) cut it into stretches, every event in one of them
    events = [Metrics("r", i, 1.0, {"loss": 0.5}) for i in range(300)]
    assert [(s.start, s.stop, s.columns) for s in store_columns.segments(events)] == [
        (0, 128, True), (128, 256, True), (256, 300, True)]
