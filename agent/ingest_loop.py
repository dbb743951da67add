"""The ingest loop: one worker thread that sleeps on the doorbell, drains the rings when a producer rings,
lingers a few milliseconds while events flow (so a busy producer never rings), and sleeps again; a slow
scan finds new rings, spill files and finished producers (and bounds any event a lost wake-up would delay).
It also does the WAL's group commit (``wal.fsync: interval``): while events stream in, an fsync at most
every ``fsync_ms``; before it sleeps, one for what it drained (so a lone event costs one wake-up, and is
durable at once); none while idle.

A thread of its own rather than event-loop tasks: a wake-up then costs a syscall and a drain, not three
hops between the loop and the thread pool (about 250 µs of CPU per wake-up, measured: most of the agent's
cost at a trickle). It is owned by the agent's task group like any task (``run``), and stops when cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel

from flightlog.proto.errors import WALError

from .doorbell import Doorbell
from .ingest import Ingestor
from .owned_thread import run_owned_thread

__all__ = ["LINGER_SECONDS", "SCAN_SECONDS", "IngestLoop"]

log = logging.getLogger("flightlog.agent")

#: Awake after a drain that found events: wait this long for more before draining again (batches a trickle
#: into few WAL records and wake-ups; producers do not ring while the agent is awake). A flood does not wait.
LINGER_SECONDS = 0.05
#: A drain of at least this many events means a flood: drain again at once rather than linger.
FLOOD_EVENTS = 4096
#: ``on_ingested`` (it wakes the sinks, a round trip to the event loop) runs at most this often: sinks batch
#: for far longer than this anyway.
NOTIFY_SECONDS = 0.1
#: The safety scan: new rings, spill files, dead producers, and a bound on a wake-up lost to a race.
SCAN_SECONDS = 1.0


class IngestLoop:
    """Owns the draining of every ring. ``on_ingested`` runs on the event loop after events reached the WAL."""

    def __init__(self, ingestor: Ingestor, doorbell: Doorbell, wal_dir: Path, on_ingested: Callable[[], None],
                 *, linger: float = LINGER_SECONDS, scan_every: float = SCAN_SECONDS,
                 fsync_every: float | None = None, on_ingested_threadsafe: bool = False) -> None:
        self.ingestor = ingestor
        self.wal = ingestor.wal
        self.fsync_every = fsync_every  # None: the WAL syncs on every append ("always") or never
        self.doorbell = doorbell
        self.wal_dir = wal_dir
        self.on_ingested = on_ingested
        # False: on_ingested must run on the event loop (a round trip to it per drain); True: call it here.
        self.on_ingested_threadsafe = on_ingested_threadsafe
        self.linger = linger
        self.scan_every = scan_every
        self.rate = 0.0  # events/s, over about the last second
        self.error = ""  # why the WAL refuses appends, while it does (an alert in status)
        self.wakeups = 0  # doorbell wake-ups (status shows it)
        self._rescan = False
        self._synced = 0.0  # monotonic time of the last group commit
        self._unnotified = False  # events reached the WAL since on_ingested last ran
        self._notified = -NOTIFY_SECONDS
        self._slept = 0.0  # how long the last doorbell sleep lasted: events come sparsely, or in a stream
        self._stop = threading.Event()
        self._token: object = None

    def kick(self, *, rescan: bool = False) -> None:
        """Drain soon, whatever the rings' sleeping words say; ``rescan``: look for new rings first. Also
        after an append from elsewhere (the agent's own events), so that the group commit covers it.
        Thread-safe."""
        if rescan:
            self._rescan = True
        self.doorbell.ring()

    async def run(self) -> None:
        """The loop's thread, for as long as the calling task runs (cancel it to stop)."""
        self._token = anyio.lowlevel.current_token()
        self._stop.clear()
        await run_owned_thread(self._thread, self._stop_thread)

    def _stop_thread(self) -> None:
        self._stop.set()
        self.kick()

    def _thread(self) -> None:
        while not self._stop.is_set():
            try:
                self._pump()
            except (WALError, OSError) as exc:
                # Disk full, most likely. The rings keep every event (read cursors were not advanced):
                # keep the agent up, say so, and try again.
                self.error = f"cannot append to the WAL in {self.wal_dir}: {exc}"
                log.error("%s; events wait in the rings and spill files; retrying in 1 s (free disk space)",
                          self.error)
                self._stop.wait(1.0)

    def _maybe_notify(self, *, force: bool = False) -> float:
        """Run on_ingested if events are unannounced and the last call is NOTIFY_SECONDS old (``force``:
        whatever its age); returns when the next one is due (``inf``: nothing to announce)."""
        if not self._unnotified:
            return float("inf")
        now = time.monotonic()
        due = self._notified + NOTIFY_SECONDS
        if now < due and not force:
            return due
        self._unnotified = False
        self._notified = now
        self._notify()
        return float("inf")

    def _notify(self) -> None:
        if self.on_ingested_threadsafe:
            self.on_ingested()
            return
        try:
            anyio.from_thread.run_sync(self.on_ingested, token=self._token)  # type: ignore[arg-type]
        except anyio.RunFinishedError:
            pass  # the agent is stopping; its final drain wakes nobody

    def _pump(self) -> None:
        ing = self.ingestor
        last_scan = -self.scan_every
        t0, n0 = time.monotonic(), ing.events_total
        while not self._stop.is_set():
            now = time.monotonic()
            if self._rescan or now - last_scan >= self.scan_every:
                # New rings; and the full pass retires idle rings of finished producers.
                self._rescan = False
                ing.scan()
                n = ing.drain()
                last_scan = now
            elif ing.has_pending():
                n = ing.drain()
            else:
                n = 0
            if now - t0 >= 1.0:
                self.rate = (ing.events_total - n0) / (now - t0)
                t0, n0 = now, ing.events_total
            if n:
                self.error = ""
                self._unnotified = True
            # Linger only while events stream in (they came faster than the linger): a lone event after a
            # sleep would pay for a second wake-up, the linger's, for nothing.
            stream = n > 0 and (n > 1 or self._slept < self.linger)
            if not stream:
                # About to sleep: commit and announce what this wake-up drained now, rather than waking
                # again for the group commit's or the notification's timer (one wake-up per lone event).
                self._group_commit(force=True)
                self._maybe_notify(force=True)
                self._sleep(last_scan + self.scan_every - time.monotonic())
                continue
            due = min(self._group_commit(), self._maybe_notify())
            if n < FLOOD_EVENTS and self.doorbell.wait(min(self.linger, due - time.monotonic())):
                self.doorbell.clear()  # a kick (flush, stop) cut the linger short

    def _group_commit(self, *, force: bool = False) -> float:
        """fsync the WAL if it holds appends and the last fsync is ``fsync_every`` old (``force``: before
        sleeping, whatever its age); returns when the next one is due (``inf``: nothing to commit)."""
        if self.fsync_every is None or not self.wal.dirty:
            return float("inf")
        now = time.monotonic()
        due = self._synced + self.fsync_every
        if now < due and not force:
            return due
        self.wal.sync()
        self._synced = now
        return float("inf")

    def _sleep(self, timeout: float) -> None:
        """Set the sleeping words, look once more (a frame published before its producer could see the word
        would otherwise wait for the scan), then wait for the doorbell or the next scan."""
        ing = self.ingestor
        ing.set_sleeping(True)
        rung = False
        try:
            # has_pending takes the ring table's lock: a locked instruction, so the stores above are visible
            # before the write words are read again.
            if ing.has_pending():
                self._slept = 0.0
                return
            t0 = time.monotonic()
            rung = self.doorbell.wait(timeout)
            self._slept = time.monotonic() - t0
            self.wakeups += rung
        finally:
            ing.set_sleeping(False)
            if rung:
                self.doorbell.clear()  # a ring that came after a timeout is read on the next wake-up
