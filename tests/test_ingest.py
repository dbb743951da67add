"""Ingest in one process with a real WAL: backlogs cut into records at frame boundaries (and resumed from
the WAL's positions), spill frames larger than a read chunk, and the doorbell that drives the ingest loop."""
from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flightlog.agent.ingest as ingest_mod
from flightlog.agent.doorbell import Doorbell
from flightlog.agent.ingest import Ingestor
from flightlog.agent.ingest_loop import IngestLoop
from flightlog.agent.ring import RingView
from flightlog.agent.wal import WAL, WalCursor, WALReader
from flightlog.proto.frames import count_frames, iter_frames
from flightlog.proto.paths import DOORBELL_NAME
from flightlog.proto.ring import (
    BYTE_MASK,
    FRAME_MASK,
    OFF_READ,
    OFF_WRITE,
    cursor_distance,
    pack_cursor,
)
from flightlog.ring import RingProducer


def _producer(ring_dir: Path, size: int = 1 << 16) -> RingProducer:
    pid = "p" + uuid.uuid4().hex[:8]
    return RingProducer(ring_dir / f"{pid}.ring", size, pid, ring_dir / "spill")


def _wal_payloads(wal_dir: Path) -> list[bytes]:
    with WALReader(wal_dir) as reader:
        out, cursor = [], WalCursor.start()
        while True:
            batch, cursor = reader.read(cursor, max_events=100_000, max_bytes=1 << 30)
            if not batch:
                return out
            out.extend(bytes(p) for _, p in batch)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=200), st.integers(8, 2048),
       st.integers(0, 4095), st.booleans())
def test_boundary_cuts_at_frames_and_counts_them(tmp_path: Path, payloads: list[bytes], limit: int,
                                                 offset: int, near_wrap: bool) -> None:
    """Any backlog cut by ``boundary`` into spans of at most ``limit`` bytes (or one frame) yields every
    frame once, in order, and each cut's word counts exactly the frames and bytes before it (across the
    padding frame of a wrap, and across the counters' own wrap)."""
    prod = _producer(tmp_path, 4096)
    start_bytes = ((BYTE_MASK + 1) - 4096 if near_wrap else 0) + (offset & ~7)
    word = pack_cursor(FRAME_MASK - 3 if near_wrap else 0, start_bytes)
    prod._w, prod._word, prod._free_until = start_bytes, word, start_bytes + prod.size
    prod._cursors[OFF_WRITE // 8] = prod._cursors[OFF_READ // 8] = word
    prod._update_limit()
    view = RingView(prod.path)
    sent: list[bytes] = []
    got: list[bytes] = []
    for i, p in enumerate(payloads):
        payload = i.to_bytes(4, "little") + p
        before = prod.spilled
        prod.write_frame(payload)
        if prod.spilled == before:
            sent.append(payload)
        else:  # ring full: that one went to the spill file; this test is about the ring
            break
    r, w = view.read_word, view.write_word
    while r != w:
        cut = view.boundary(r, w, limit)
        taken = view.take(r, cut)
        assert taken is not None
        data, count, after = taken
        assert after == cut and count == count_frames(data) >= 1
        assert count == 1 or len(data) <= limit
        assert cursor_distance(r, cut)[0] == count
        got.extend(bytes(f) for f in iter_frames(data))
        view.read_word = r = after
    assert got == sent
    view.close()
    prod.close(unlink=True)


def test_large_backlog_is_several_records_and_resumes_from_their_positions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog over the record limit goes in as several records, each with its own producer position:
    an agent that lost the read cursor after the last one resumes there and ingests nothing twice."""
    monkeypatch.setattr(ingest_mod, "_MAX_RING_RECORD", 1024)
    ring_dir = tmp_path / "rings"
    ring_dir.mkdir()
    prod = _producer(ring_dir)
    sent = [i.to_bytes(4, "little") * (1 + i % 9) for i in range(1000)]  # ~20 KB: about 20 records
    for p in sent:
        prod.write_frame(p)
    wal = WAL(tmp_path / "wal", fsync="never")
    start = RingView(prod.path).read_word
    ing = Ingestor(wal, ring_dir)
    ing.scan()
    assert ing.drain() == len(sent)
    records = wal.next_seq
    ing.close()
    wal.close()
    wal = WAL(tmp_path / "wal", fsync="never")
    rec = wal.recovery
    assert rec.next_seq == records == len(sent)
    # The agent "crashed" before storing the read cursor: it is back at the start.
    view = RingView(prod.path)
    (_gen, end) = rec.producer_positions[(prod.producer_id, ingest_mod.SRC_RING)]
    assert end == view.write_word
    view.read_word = start
    view.close()
    ing = Ingestor(wal, ring_dir, rec.producer_positions)
    ing.scan()
    assert ing.drain() == 0  # resumed past what the WAL holds
    ing.close()
    wal.close()
    assert _wal_payloads(tmp_path / "wal") == sent
    from flightlog.agent.wal import inspect_wal

    report = inspect_wal(tmp_path / "wal")
    assert sum(s["records"] for s in report["segments"]) >= 10  # cut, not one record
    prod.close(unlink=True)


def test_spilled_frame_larger_than_a_read_chunk_is_ingested(tmp_path: Path) -> None:
    """A frame larger than the ring goes to the spill file; one larger than the 4 MiB read chunk used to
    stop the spill file's ingest for good (nothing after it either)."""
    ring_dir = tmp_path / "rings"
    ring_dir.mkdir()
    prod = _producer(ring_dir)
    big = bytes(range(256)) * (5 << 12)  # 5 MiB
    prod.write_frame(big)
    prod.write_frame(b"after")  # still spilling: the agent has not consumed the file yet
    assert prod.spilled == 2
    wal = WAL(tmp_path / "wal", fsync="never")
    ing = Ingestor(wal, ring_dir)
    ing.scan()
    assert ing.has_pending()  # a spill file counts as pending work (the loop would not sleep on it)
    assert ing.drain() == 2
    assert not ing.has_pending()
    prod.write_frame(b"ring again")  # spill consumed: back to the ring
    assert ing.drain() == 1
    ing.close()
    wal.close()
    assert _wal_payloads(tmp_path / "wal") == [big, b"after", b"ring again"]
    prod.close(unlink=True)


def test_producer_rings_only_while_the_agent_sleeps(tmp_path: Path) -> None:
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bell.bind(str(tmp_path / DOORBELL_NAME))
    bell.setblocking(False)
    prod = _producer(tmp_path)
    view = RingView(prod.path)
    for _ in range(100):
        prod.write_frame(b"awake")
    with pytest.raises(BlockingIOError):
        bell.recv(8)  # the agent is awake: no syscall, no datagram
    view.sleeping = 7  # the agent's 7th sleep
    prod.write_frame(b"wake up")
    prod.write_frame(b"and again")  # the agent has not woken yet: once per sleep is enough
    assert bell.recv(8) == b"\x01"
    with pytest.raises(BlockingIOError):
        bell.recv(8)
    view.sleeping = 0
    prod.write_frame(b"awake again")
    with pytest.raises(BlockingIOError):
        bell.recv(8)
    view.sleeping = 8  # the next sleep
    prod.write_frame(b"wake up once more")
    assert bell.recv(8) == b"\x01"
    bell.close()
    view.close()
    prod.close(unlink=True)


def test_ring_bell_without_an_agent_never_fails_the_log_call(tmp_path: Path) -> None:
    prod = _producer(tmp_path)
    view = RingView(prod.path)
    view.sleeping = 3  # a stale word from an agent that died asleep: nobody listens on the doorbell
    for _ in range(10):
        prod.write_frame(b"x")
    assert cursor_distance(view.read_word, view.write_word)[0] == 10
    assert prod._rang_for == 3  # tried once for that sleep: not a failing syscall per log call
    view.close()
    prod.close(unlink=True)


def _loop_parts(tmp_path: Path, on_ingested: Callable[[], None] = lambda: None
                ) -> tuple[Path, WAL, Ingestor, IngestLoop]:
    ring_dir = tmp_path / "rings"
    ring_dir.mkdir()
    wal = WAL(tmp_path / "wal", fsync="never")
    ing = Ingestor(wal, ring_dir)
    # A scan period far beyond the test: only the doorbell (or the re-check) can make the loop drain.
    loop = IngestLoop(ing, Doorbell(ring_dir / DOORBELL_NAME), tmp_path / "wal", on_ingested, scan_every=3600)
    return ring_dir, wal, ing, loop


def test_ingest_loop_sleeps_until_the_doorbell_rings(tmp_path: Path) -> None:
    ingested: list[int] = []
    ring_dir, wal, ing, loop = _loop_parts(tmp_path, lambda: ingested.append(wal.next_seq))
    prod = _producer(ring_dir)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            with anyio.fail_after(60):  # a hang guard, not a timing assertion
                while not RingView(prod.path).sleeping:  # scanned the ring, found it empty, asleep
                    await anyio.sleep(0.01)
                prod.write_frame(b"one")  # sees the sleeping word: rings
                while not ingested:  # on_ingested runs on the event loop
                    await anyio.sleep(0.01)
            assert loop.wakeups >= 1 and ingested == [1]
            tg.cancel_scope.cancel()  # stops the loop's thread too

    anyio.run(main)
    loop.doorbell.close()
    ing.close()
    wal.close()
    assert _wal_payloads(tmp_path / "wal") == [b"one"]
    prod.close(unlink=True)


def test_ingest_loop_rechecks_after_setting_the_word(tmp_path: Path) -> None:
    """A frame published just before the word was set (so its producer did not ring) is found by the
    re-check, not left for the next scan."""
    ring_dir, wal, ing, loop = _loop_parts(tmp_path)
    prod = _producer(ring_dir)
    ing.scan()
    prod.write_frame(b"raced")  # the word is clear: no ring
    sleeper = threading.Thread(target=loop._sleep, args=(3600,), daemon=True)
    sleeper.start()
    sleeper.join(60)  # a hang guard: the re-check returns at once
    assert not sleeper.is_alive()
    assert ing.has_pending() and not RingView(prod.path).sleeping
    assert ing.drain() == 1
    loop.doorbell.close()
    ing.close()
    wal.close()
    prod.close(unlink=True)
