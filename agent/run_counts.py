"""Per-run delivery counts for the health report: how many of a run's events each sink delivered (counted
by the engine at each ack) and how many wait in the WAL past a sink's cursor (counted here, when asked, from
an index of which seqs belong to which run, built by reading forward only from where the last look stopped)."""
from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

import msgspec

from flightlog.proto.events import Event

from .wal import WALReader
from .wal.format import WalCursor

__all__ = ["RunIndex", "count_delivered"]

_READ_EVENTS = 20_000  # per WAL read
#: At most this many events are indexed per look (about 0.2 s; the next look goes on from there): a sink stuck
#: under a flood of events costs the health report a bounded share of a core, and its counts lag instead.
LOOK_EVENTS = 100_000


class _Head(msgspec.Struct, array_like=True):
    """An event's first two fields: every event is ``[tag, run_id, ...]`` (the rest is skipped, not built)."""

    tag: str
    run_id: str


_head_decoder = msgspec.msgpack.Decoder(_Head)


def count_delivered(per_run: dict[str, int], events: list[tuple[int, Event]], runs: set[str]) -> None:
    """Add a delivered batch to ``per_run`` (run id -> events): one addition for a batch of one run (the
    common case), one per event otherwise."""
    if len(runs) == 1:
        rid = next(iter(runs))
        per_run[rid] = per_run.get(rid, 0) + len(events)
        return
    for _, ev in events:
        rid = ev.run_id
        per_run[rid] = per_run.get(rid, 0) + 1


class RunIndex:
    """Which WAL seqs are whose, as intervals per run, between the lowest cursor that asked and what has been
    read. Reads only what it has not read yet; forgets what every asker has passed. Thread-safe."""

    def __init__(self, wal_dir: str, limit: Callable[[], tuple[int, int]] | None = None) -> None:
        self._reader = WALReader(wal_dir, limit=limit)
        self._lock = threading.Lock()
        self._read = WalCursor()  # read up to here (its seq: the first seq not indexed)
        self._low = 0  # nothing below this seq is indexed
        self._starts: dict[str, list[int]] = {}  # run -> interval starts (sorted)
        self._ends: dict[str, list[int]] = {}  # run -> interval ends (exclusive)
        self.decoded = 0  # events looked at (a test sees that a second look reads nothing again)

    @property
    def indexed_to(self) -> int:
        """The first seq not indexed yet: counts up to a seq past it are lower bounds."""
        return self._read.seq

    def pending(self, run_id: str, lows: list[WalCursor], upto: int, tail: int) -> list[tuple[int, int]]:
        """For each cursor of ``lows``: the run's events with seq in [cursor.seq, upto) and [cursor.seq, tail)
        (exact up to ``indexed_to``)."""
        if not lows:
            return []
        with self._lock:
            self._advance(min(lows, key=lambda c: c.seq), max(upto, tail))
            return [(self._count(run_id, c.seq, upto), self._count(run_id, c.seq, tail)) for c in lows]

    def _advance(self, low: WalCursor, upto: int) -> None:
        if low.seq > self._read.seq or low.seq < self._low:
            # Every asker is past what was read (or one is before it, after a restart of its sink): start over
            # at the lowest cursor, a record boundary the reader can resume from.
            self._starts.clear()
            self._ends.clear()
            self._read, self._low = low, low.seq
        else:
            self._forget_below(low.seq)
        budget = LOOK_EVENTS
        while self._read.seq < upto and budget > 0:
            items, end = self._reader.read(self._read, max_events=min(_READ_EVENTS, budget))
            if not items:
                if end.seq > self._read.seq:  # a segment end, or seqs skipped over damage
                    self._read = end
                    continue
                break
            for seq, payload in items:
                try:
                    rid = _head_decoder.decode(payload).run_id
                except msgspec.DecodeError:  # undecodable: no sink delivers it either
                    continue
                self._note(rid, seq)
            self.decoded += len(items)
            budget -= len(items)
            self._read = end

    def _note(self, run_id: str, seq: int) -> None:
        ends = self._ends.get(run_id)
        if ends is None:
            self._starts[run_id] = [seq]
            self._ends[run_id] = [seq + 1]
        elif ends[-1] == seq:
            ends[-1] = seq + 1
        else:
            self._starts[run_id].append(seq)
            ends.append(seq + 1)

    def _forget_below(self, seq: int) -> None:
        if seq <= self._low:
            return
        self._low = seq
        for run_id in list(self._ends):
            ends = self._ends[run_id]
            i = bisect.bisect_right(ends, seq)  # intervals wholly below seq
            if i == len(ends):
                del self._ends[run_id], self._starts[run_id]
            elif i:
                del ends[:i], self._starts[run_id][:i]

    def _count(self, run_id: str, lo: int, hi: int) -> int:
        starts, ends = self._starts.get(run_id), self._ends.get(run_id)
        if not starts or not ends:
            return 0
        n = 0
        for i in range(bisect.bisect_right(ends, lo), len(ends)):
            s, e = max(starts[i], lo), min(ends[i], hi)
            if s >= hi:
                break
            n += max(0, e - s)
        return n

    def close(self) -> None:
        with self._lock:
            self._reader.close()
