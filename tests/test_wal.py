"""Tests of the agent's write-ahead log: round trips, cursors, torn tails, bit flips, recovery, inspect."""
from __future__ import annotations

import logging
import mmap
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.agent.wal import WAL, WalCursor, WALReader, inspect_wal
from flightlog.agent.wal.format import (
    MAX_RECORD_BYTES,
    SEGMENT_HEADER_SIZE,
    Gap,
    Record,
    decode_record,
    encode_record,
    resync,
    scan,
)
from flightlog.proto.errors import WALError
from flightlog.proto.frames import append_frame


def frames_of(payloads: list[bytes]) -> bytes:
    buf = bytearray()
    for p in payloads:
        append_frame(buf, p)
    return bytes(buf)


def write_batches(wal: WAL, batches: list[list[bytes]], producer: str = "p") -> list[tuple[int, bytes]]:
    """Append each batch as one record; return the expected (seq, payload) stream."""
    out = []
    for b in batches:
        seq = wal.append(frames_of(b), len(b), producer)
        out += [(seq + i, p) for i, p in enumerate(b)]
    return out


def read_all(directory: Path, chunk: int = 1000, cursor: WalCursor | None = None, **kw: object):
    reader = WALReader(directory, **kw)  # type: ignore[arg-type]
    cursor = cursor or WalCursor.start()
    got: list[tuple[int, bytes]] = []
    with reader:
        while True:
            events, cursor = reader.read(cursor, max_events=chunk)
            if not events:
                return got, cursor, reader
            assert len(events) <= chunk
            got += [(s, bytes(p)) for s, p in events]


def record_offsets(path: Path) -> list[Record]:
    buf = path.read_bytes()
    return [r for r in scan(buf, SEGMENT_HEADER_SIZE, len(buf)) if isinstance(r, Record)]


def unique_batches(n_records: int, rng: random.Random, max_frames: int = 12) -> list[list[bytes]]:
    return [
        [f"r{r}f{i}:".encode() + rng.randbytes(rng.randrange(0, 60)) for i in range(rng.randrange(1, max_frames))]
        for r in range(n_records)
    ]


# --- format -----------------------------------------------------------------------------------------


def test_record_encode_decode_and_alignment() -> None:
    rec = encode_record(frames_of([b"abc", b""]), 2, 7, "prod-é", src_kind=1, src_gen=3, src_end=99)
    assert len(rec) % 8 == 0
    r = decode_record(rec, 0, len(rec))
    assert isinstance(r, Record)
    assert (r.count, r.first_seq, r.src_kind, r.src_gen, r.src_end, r.producer_id) == (2, 7, 1, 3, 99, "prod-é")
    assert r.size == len(rec)
    assert not isinstance(decode_record(rec, 0, len(rec) - 1), Record)  # padding must be present too
    with pytest.raises(WALError, match="255"):
        encode_record(b"", 0, 0, "x" * 256)


def test_oversized_record_is_a_wal_error() -> None:
    """The agent's ingest loop catches WALError; a plain ValueError here once killed it at start."""
    big = mmap.mmap(-1, MAX_RECORD_BYTES + 8)  # anonymous: never touched, so never committed
    try:
        with pytest.raises(WALError, match="cut the batch"):
            encode_record(memoryview(big), 1, 0, "p")
    finally:
        big.close()


def test_resync_ignores_misaligned_and_invalid_magic() -> None:
    good = encode_record(frames_of([b"x"]), 1, 0, "p")
    junk = bytearray(64)
    junk[3:7] = b"FLWR"  # misaligned
    junk[16:20] = b"FLWR"  # aligned but no valid record
    buf = bytes(junk) + good
    assert resync(buf, 0, len(buf)) == 64
    items = list(scan(buf, 0, len(buf)))
    assert isinstance(items[0], Gap) and items[0].length == 64 and not items[0].tail
    assert isinstance(items[1], Record)


# --- round trips --------------------------------------------------------------------------------------


def test_round_trip_across_rotations_and_cursors(tmp_path: Path) -> None:
    rng = random.Random(1)
    batches = unique_batches(120, rng)
    with WAL(tmp_path, segment_bytes=2048) as wal:
        expected = write_batches(wal, batches)
        assert wal.next_seq == len(expected)
        segs = wal.segments()
        assert len(segs) > 5
        assert [s.first_seq for s in segs] == sorted(s.first_seq for s in segs)
        assert all(s.path.name == f"{s.first_seq:020d}.wal" for s in segs)
        assert wal.total_bytes() == sum(s.size for s in segs)
        limit = wal.end_position
        assert limit() == (segs[-1].first_seq, segs[-1].size)
        for chunk in (1, 3, 7, 1000):
            got, cursor, reader = read_all(tmp_path, chunk, limit=limit)
            assert got == expected
            assert reader.corrupt_records == 0
            assert cursor == WalCursor(segs[-1].first_seq, segs[-1].size, len(expected))
        assert read_all(tmp_path)[0] == expected  # no limit: same result


def test_cursor_mid_record_and_record_end(tmp_path: Path) -> None:
    with WAL(tmp_path) as wal:
        expected = write_batches(wal, [[b"a%d" % i for i in range(10)], [b"b%d" % i for i in range(4)]])
    recs = record_offsets(tmp_path / f"{0:020d}.wal")
    with WALReader(tmp_path) as reader:
        ev, cur = reader.read(WalCursor.start(), max_events=3)
        assert [(s, bytes(p)) for s, p in ev] == expected[:3]
        assert cur == WalCursor(0, recs[0].offset, 3)  # mid-record: same record, seq advanced
        ev, cur = reader.read(cur, max_events=7)
        assert [(s, bytes(p)) for s, p in ev] == expected[3:10]
        assert cur == WalCursor(0, recs[1].offset, 10)  # at record end: next record
        # the cursor survives serialisation, and a fresh reader resumes from it
        cur = msgspec.msgpack.decode(msgspec.msgpack.encode(cur), type=WalCursor)
    with WALReader(tmp_path) as reader:
        ev, cur = reader.read(cur, max_events=100)
        assert [(s, bytes(p)) for s, p in ev] == expected[10:]
        ev, cur2 = reader.read(cur)
        assert ev == [] and cur2 == cur
    # a cursor with only a seq (offset 0) finds its place by seq
    got, _, _ = read_all(tmp_path, cursor=WalCursor(0, 0, 5))
    assert got == expected[5:]


def test_max_bytes_limits_batch(tmp_path: Path) -> None:
    with WAL(tmp_path) as wal:
        expected = write_batches(wal, [[bytes(100)] * 10])
    with WALReader(tmp_path) as reader:
        ev, cur = reader.read(WalCursor.start(), max_bytes=250)
        assert len(ev) == 3 and cur.seq == 3  # 3 x 104 framed bytes >= 250
        ev, cur = reader.read(cur, max_bytes=1)
        assert len(ev) == 1 and ev[0][0] == 3  # always progress
    assert len(expected) == 10


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=8), min_size=1, max_size=30),
    chunks=st.lists(st.integers(1, 12), min_size=1, max_size=10),
    segment_bytes=st.sampled_from([256, 1024, 1 << 20]),
)
def test_property_round_trip(batches: list[list[bytes]], chunks: list[int], segment_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        with WAL(d, segment_bytes=segment_bytes, fsync="never") as wal:
            expected = write_batches(wal, batches)
            with WALReader(d, limit=wal.end_position) as reader:
                cursor, got, i = WalCursor.start(), [], 0
                while True:
                    n = chunks[i % len(chunks)]
                    i += 1
                    ev, cursor = reader.read(cursor, max_events=n)
                    assert len(ev) <= n
                    if not ev:
                        break
                    got += [(s, bytes(p)) for s, p in ev]
        assert got == expected
        assert [s for s, _ in got] == list(range(len(got)))


# --- torn tails ----------------------------------------------------------------------------------------


def test_torn_tail_every_offset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with WAL(src) as wal:
        expected = write_batches(wal, [[b"keep%d" % i] * 3 for i in range(4)] + [[b"torn-a" * 5, b"torn-b" * 7]])
    seg = src / f"{0:020d}.wal"
    last = record_offsets(seg)[-1]
    kept = expected[:-2]
    for cut in range(last.offset, last.offset + last.size):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(src, d)
        os.truncate(d / seg.name, cut)
        with WAL(d) as wal:
            rep = wal.recovery
            assert rep.truncated_bytes == cut - last.offset
            assert (rep.corrupt_records, rep.skipped_bytes) == (0, 0)
            assert rep.next_seq == wal.next_seq == len(kept)
            assert (d / seg.name).stat().st_size == last.offset
            after = write_batches(wal, [[b"after"]])
            assert read_all(d, limit=wal.end_position)[0] == kept + after
        shutil.rmtree(d)


def test_torn_segment_creation(tmp_path: Path) -> None:
    with WAL(tmp_path, segment_bytes=256) as wal:
        expected = write_batches(wal, [[bytes(100)], [bytes(100)]])
        assert len(wal.segments()) == 2
    (tmp_path / f"{2:020d}.wal").write_bytes(b"")  # crashed right after creating the third segment
    assert inspect_wal(tmp_path)["totals"]["torn_tail_bytes"] == 0
    with WAL(tmp_path, segment_bytes=256) as wal:
        assert wal.next_seq == 2 and len(wal.segments()) == 2
        expected += write_batches(wal, [[b"x"]])
    assert read_all(tmp_path)[0] == expected


# --- bit flips -------------------------------------------------------------------------------------------

FLIPS = {"magic": (0, 0), "length_low": (4, 3), "length_high": (7, 6), "crc": (8, 0), "payload": (60, 2)}


@pytest.mark.parametrize("where", ["last", "middle"])
@pytest.mark.parametrize("field", list(FLIPS))
def test_bit_flip_skips_exactly_one_record(tmp_path: Path, where: str, field: str) -> None:
    rng = random.Random(field + where)
    batches = [[f"r{r}f{i}:".encode() + rng.randbytes(30) for i in range(4)] for r in range(15)]
    with WAL(tmp_path, segment_bytes=1024) as wal:
        expected = write_batches(wal, batches)
        segs = wal.segments()
    assert len(segs) >= 3
    seg = segs[-1] if where == "last" else segs[1]
    recs = record_offsets(seg.path)
    assert len(recs) >= 3
    bad = recs[len(recs) // 2]
    byte, bit = FLIPS[field]
    data = bytearray(seg.path.read_bytes())
    data[bad.offset + byte] ^= 1 << bit
    seg.path.write_bytes(data)
    bad_seqs = set(range(bad.first_seq, bad.first_seq + bad.count))
    survivors = [e for e in expected if e[0] not in bad_seqs]

    for chunk in (1, 5, 1000):  # the reader skips it on its own, without recovery
        got, _, reader = read_all(tmp_path, chunk)
        assert got == survivors
        assert reader.corrupt_records == 1

    report = inspect_wal(tmp_path)
    corrupt = [c for s in report["segments"] for c in s["corrupt"]]
    assert corrupt == [{"offset": bad.offset, "length": bad.size, "reason": corrupt[0]["reason"]}]
    want = {"magic": "bad magic", "length_high": "length out of range"}.get(field, "bad crc")
    assert corrupt[0]["reason"] == want
    assert report["totals"]["torn_tail_bytes"] == 0

    with WAL(tmp_path, segment_bytes=1024) as wal:
        rep = wal.recovery
        assert (rep.corrupt_records, rep.skipped_bytes, rep.truncated_bytes) == (1, bad.size, 0)
        assert rep.next_seq == len(expected)
        more = write_batches(wal, [[b"more"]])
        got, _, reader = read_all(tmp_path, 7, limit=wal.end_position)
        assert got == survivors + more and reader.corrupt_records == 1


def test_recovery_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with WAL(tmp_path) as wal:
        write_batches(wal, [[b"a"], [b"b"]])
    seg = tmp_path / f"{0:020d}.wal"
    os.truncate(seg, seg.stat().st_size - 3)
    with caplog.at_level(logging.WARNING, logger="flightlog.wal"):
        WAL(tmp_path).close()
    assert len([r for r in caplog.records if r.name == "flightlog.wal"]) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flightlog.wal"):
        WAL(tmp_path).close()
    assert not caplog.records


# --- live reading ---------------------------------------------------------------------------------------


def test_reader_waits_on_incomplete_tail_and_respects_limit(tmp_path: Path) -> None:
    with WAL(tmp_path) as wal:
        expected = write_batches(wal, [[b"one"], [b"two"]])
        end = wal.end_position()
    seg = tmp_path / f"{0:020d}.wal"
    rec = encode_record(frames_of([b"three"]), 1, 2, "p")
    with open(seg, "ab") as f:
        f.write(rec[:20])  # a writer in the middle of a record
    with WALReader(tmp_path) as reader:
        got, cur = reader.read(WalCursor.start())
        assert [(s, bytes(p)) for s, p in got] == expected and reader.corrupt_records == 0
        assert cur.offset == end[1]
        assert reader.read(cur) == ([], cur)
        with open(seg, "ab") as f:
            f.write(rec[20:])
        got, cur = reader.read(cur)
        assert [(s, bytes(p)) for s, p in got] == [(2, b"three")]
    with WALReader(tmp_path, limit=lambda: end) as reader:  # never past the limit
        got, cur = reader.read(WalCursor.start())
        assert len(got) == 2 and cur == WalCursor(0, end[1], 2)
        _, nbytes = reader.backlog(cur)
        assert nbytes == 0


def test_sync_from_thread_during_rotation(tmp_path: Path) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def syncer(wal: WAL) -> None:
        try:
            while not stop.is_set():
                wal.sync()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with WAL(tmp_path, segment_bytes=4096) as wal:
        t = threading.Thread(target=syncer, args=(wal,))
        t.start()
        expected = write_batches(wal, [[bytes(50)] * 5 for _ in range(200)])
        stop.set()
        t.join()
    assert not errors
    assert read_all(tmp_path)[0] == expected


# --- recovery state, retention, inspect, errors -----------------------------------------------------


def test_producer_positions_after_reopen(tmp_path: Path) -> None:
    f = frames_of([b"e"])
    with WAL(tmp_path, segment_bytes=512, fsync="always") as wal:
        wal.append(f, 1, "a", src_kind=0, src_end=100)
        wal.append(f, 1, "a", src_kind=0, src_end=300)
        wal.append(f, 1, "a", src_kind=1, src_gen=2, src_end=10)
        wal.append(f, 1, "a", src_kind=1, src_gen=3, src_end=20)
        wal.append(f, 1, "b", src_kind=2, src_end=5)
        wal.append(f, 1, "a", src_kind=0, src_end=200)  # a wrapped (modular) ring word: newest wins, not max
    with WAL(tmp_path) as wal:
        assert wal.recovery.producer_positions == {("a", 0): (0, 200), ("a", 1): (3, 20), ("b", 2): (0, 5)}
        assert wal.recovery.next_seq == 6 and wal.recovery.segments == len(wal.segments())


def test_delete_before(tmp_path: Path) -> None:
    with WAL(tmp_path, segment_bytes=512) as wal:
        expected = write_batches(wal, [[bytes(60)] * 3 for _ in range(20)])
        firsts = [s.first_seq for s in wal.segments()]
        assert len(firsts) > 4
        assert wal.delete_before(firsts[1] - 1) == []  # segment 0 still holds seq firsts[1]-1
        deleted = wal.delete_before(firsts[2])
        assert [p.name for p in deleted] == [f"{s:020d}.wal" for s in firsts[:2]]
        # a cursor into a deleted segment resumes by seq; a start cursor begins at the oldest segment
        got, _, _ = read_all(tmp_path, cursor=WalCursor(firsts[0], 40, firsts[2] + 1), limit=wal.end_position)
        assert got == expected[firsts[2] + 1 :]
        assert read_all(tmp_path)[0] == expected[firsts[2] :]
        deleted = wal.delete_before(10**9)
        assert [s.first_seq for s in wal.segments()] == [firsts[-1]]  # never the live segment
        assert len(deleted) == len(firsts) - 3
        write_batches(wal, [[b"still works"]])


def test_inspect_clean_and_corrupted(tmp_path: Path) -> None:
    with WAL(tmp_path, segment_bytes=1024) as wal:
        write_batches(wal, [[bytes(40)] * 4 for _ in range(8)], producer="alpha")
        write_batches(wal, [[bytes(40)] * 2 for _ in range(3)], producer="beta")
    rep = inspect_wal(tmp_path)
    t = rep["totals"]
    assert (t["records"], t["events"], t["corrupt_records"], t["torn_tail_bytes"]) == (11, 38, 0, 0)
    assert (t["first_seq"], t["last_seq"]) == (0, 37)
    assert t["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.wal"))
    producers: dict[str, int] = {}
    for s in rep["segments"]:
        for k, v in s["producers"].items():
            producers[k] = producers.get(k, 0) + v
    assert producers == {"alpha": 32, "beta": 6}
    assert rep["segments"][0]["first_seq"] == 0 and rep["segments"][1]["first_seq"] == rep["segments"][0]["last_seq"] + 1

    first, last = sorted(tmp_path.glob("*.wal"))[0], sorted(tmp_path.glob("*.wal"))[-1]
    rec = record_offsets(first)[1]
    data = bytearray(first.read_bytes())
    data[rec.offset + 50] ^= 0xFF
    first.write_bytes(data)
    with open(last, "ab") as f:
        f.write(b"\x01" * 13)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rep = inspect_wal(tmp_path)
    assert rep["segments"][0]["corrupt"] == [{"offset": rec.offset, "length": rec.size, "reason": "bad crc"}]
    assert rep["segments"][-1]["torn_tail_bytes"] == 13
    assert rep["totals"]["corrupt_records"] == 1 and rep["totals"]["events"] == 38 - rec.count
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # read-only


def test_errors_on_non_wal_files(tmp_path: Path) -> None:
    with pytest.raises(WALError, match="does not exist"):
        inspect_wal(tmp_path / "nope")
    d = tmp_path / "wal"
    d.mkdir()
    bogus = d / f"{0:020d}.wal"
    bogus.write_bytes(b"this is not a write-ahead log segment at all")
    # inspect reports it (read-only); the writer moves it aside and starts (tests/test_wal_hostile.py)
    seg = inspect_wal(d)["segments"][0]
    assert seg["name"] == bogus.name and seg["error"].startswith("bad magic"), seg
    with WAL(d) as wal:
        assert [b.name for b in wal.recovery.bad_segments] == [bogus.name]
    assert (d / "quarantine" / bogus.name).read_bytes().startswith(b"this is not")
    assert bogus.read_bytes().startswith(b"FLWALSEG")  # a fresh segment took its place
    (d / "notes.wal").write_text("hi")
    with pytest.raises(WALError, match="notes.wal"):
        inspect_wal(d)


def test_options_and_lock(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        WAL(tmp_path, fsync="sometimes")  # type: ignore[arg-type]
    with WAL(tmp_path, fsync="never") as wal:
        with pytest.raises(WALError, match="locked"):
            WAL(tmp_path)
        write_batches(wal, [[b"x"]])
    wal.close()  # idempotent
    with pytest.raises(WALError, match="closed"):
        wal.append(b"", 0, "p")
    sub = tmp_path / "new"
    WAL(sub).close()
    assert sub.stat().st_mode & 0o777 == 0o700


def test_a_live_reader_lists_segments_only_when_the_writer_moved_on(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's sinks read a live WAL every few milliseconds: listing its directory each time was a
    good part of a read's cost. A reader with the writer's limit lists again only when the writer opened a
    new segment, or when retention deleted one it still had listed."""
    from flightlog.agent.wal import log as wal_log

    listings: list[int] = []
    real = wal_log._list_segments
    monkeypatch.setattr(wal_log, "_list_segments", lambda d: listings.append(1) or real(d))
    wal = WAL(tmp_path / "w", segment_bytes=4096, fsync="never")
    reader = WALReader(tmp_path / "w", limit=wal.end_position)
    one = bytearray()
    append_frame(one, b"hello")
    cursor, got = WalCursor(), []
    listings.clear()
    for _ in range(5):  # five records, all in the first segment
        wal.append(one, 1, "p")
        items, cursor = reader.read(cursor)
        got += [seq for seq, _ in items]
    assert got == list(range(5)) and len(listings) == 1
    while len(wal.segments()) < 3:  # the writer rolls over twice
        wal.append(one * 40, 40, "p")
    listings.clear()
    items, cursor = reader.read(cursor, max_events=10_000)
    assert len(listings) == 1 and items[-1][0] == wal.next_seq - 1
    items, cursor = reader.read(cursor)
    assert items == [] and len(listings) == 1  # nothing new: no listing
    # Retention deletes the first two segments; a reader behind them (a start cursor) still reads the rest.
    deleted = wal.delete_before(wal.segments()[2].first_seq)
    assert len(deleted) == 2
    items, _ = reader.read(WalCursor(), max_events=10_000)
    assert items and items[0][0] == wal.segments()[0].first_seq
    wal.close()
    reader.close()
